"""Prometheus metrics of a verifier replica, plus a rolling latency window for heartbeats.

Prometheus histograms give p50/p99 on the server side; the heartbeat carries locally computed
quantiles too, so ``/v1/status`` shows them without a Prometheus server.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conspo.protocol import Label


class VerifierMetrics:
    def __init__(self, registry: CollectorRegistry, window: int = 512) -> None:
        self.groups = Counter("conspo_verifier_groups", "Groups labelled", registry=registry)
        self.completions = Counter(
            "conspo_verifier_completions", "Completions labelled", registry=registry
        )
        self.verdicts = Counter(
            "conspo_verifier_verdicts", "Completions by verdict", ["verdict"], registry=registry
        )
        self.duplicates = Counter(
            "conspo_verifier_duplicates", "Groups delivered again and skipped", registry=registry
        )
        self.latency = Histogram(
            "conspo_verifier_group_seconds",
            "Seconds to label one group",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.backlog = Gauge(
            "conspo_verifier_rollouts_backlog", "Unlabelled groups in rollouts", registry=registry
        )
        self._window: deque[float] = deque(maxlen=window)
        self._started = time.monotonic()
        self._groups = 0
        self._completions = 0

    def observe(self, labels: list[Label], seconds: float) -> None:
        self.groups.inc()
        self.completions.inc(len(labels))
        for label in labels:
            self.verdicts.labels(verdict=label.verdict.value).inc()
        self.latency.observe(seconds)
        self._window.append(seconds)
        self._groups += 1
        self._completions += len(labels)

    def summary(self) -> dict[str, float | int]:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        ordered = sorted(self._window)

        def q(p: float) -> float:
            return (
                round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 4) if ordered else 0.0
            )

        return {
            "groups": self._groups,
            "groups_per_s": round(self._groups / elapsed, 3),
            "completions_per_s": round(self._completions / elapsed, 3),
            "p50_s": q(0.5),
            "p99_s": q(0.99),
        }
