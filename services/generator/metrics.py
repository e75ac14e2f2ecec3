"""Prometheus metrics of one generator, and the few numbers its heartbeat carries.

Counters are totals (rates are the scraper's job); the two ``*_per_second`` gauges are the rate of
the last batch, which is what an operator looking at one instance wants to see. Everything is
registered on the runtime's own registry so several generators in one test process never clash.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conspo.protocol import MetaValue


class GeneratorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.groups = Counter(
            "conspo_generator_groups", "Rollout groups published.", registry=registry
        )
        self.completions = Counter(
            "conspo_generator_completions", "Completions published.", registry=registry
        )
        self.tokens = Counter(
            "conspo_generator_tokens", "Completion tokens published.", registry=registry
        )
        self.tokens_per_s = Gauge(
            "conspo_generator_tokens_per_second",
            "Completion tokens per second of the last batch (engine time).",
            registry=registry,
        )
        self.groups_per_s = Gauge(
            "conspo_generator_groups_per_second",
            "Groups per second of the last batch (engine time).",
            registry=registry,
        )
        self.batch_occupancy = Gauge(
            "conspo_generator_batch_occupancy",
            "Prompts in the last engine call / prompts_per_batch.",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "conspo_generator_batch_seconds",
            "Wall time of one engine call.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.backpressure_seconds = Counter(
            "conspo_generator_backpressure_seconds",
            "Seconds spent waiting for budget (flow control, staleness or backlog).",
            ["reason"],
            registry=registry,
        )
        self.weight_update_seconds = Histogram(
            "conspo_generator_weight_update_seconds",
            "Seconds to apply new weights to the engine (between requests).",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.served_version = Gauge(
            "conspo_generator_served_version", "Policy version now served.", registry=registry
        )
        self.dead_lettered = Counter(
            "conspo_generator_dead_lettered", "Prompts sent to dead letters.", registry=registry
        )
        self.skipped = Counter(
            "conspo_generator_skipped",
            "Prompts acked without work: another generator already committed them.",
            registry=registry,
        )
        self.backend_errors = Counter(
            "conspo_generator_backend_errors", "Failed engine calls.", registry=registry
        )
        self._backpressure_total = 0.0
        self._last_weight_update_s = 0.0
        self._groups_total = 0
        self._tokens_total = 0
        self._tokens_per_s = 0.0
        self._served_version = 0

    def batch(
        self,
        *,
        prompts: int,
        capacity: int,
        groups: int,
        completions: int,
        tokens: int,
        seconds: float,
    ) -> None:
        self.groups.inc(groups)
        self.completions.inc(completions)
        self.tokens.inc(tokens)
        self._groups_total += groups
        self._tokens_total += tokens
        self.batch_seconds.observe(seconds)
        self.batch_occupancy.set(prompts / max(capacity, 1))
        if seconds > 0:
            self._tokens_per_s = tokens / seconds
            self.tokens_per_s.set(self._tokens_per_s)
            self.groups_per_s.set(groups / seconds)

    def waited(self, reason: str, seconds: float) -> None:
        self.backpressure_seconds.labels(reason).inc(seconds)
        self._backpressure_total += seconds

    def weights_applied(self, version: int, seconds: float) -> None:
        self.weight_update_seconds.observe(seconds)
        self.served_version.set(version)
        self._served_version = version
        self._last_weight_update_s = seconds

    def serving(self, version: int) -> None:
        self.served_version.set(version)
        self._served_version = version

    def heartbeat_info(self) -> dict[str, MetaValue]:
        """The few numbers the heartbeat (and so the api's status page) carries."""
        return {
            "groups": self._groups_total,
            "tokens": self._tokens_total,
            "tokens_per_s": round(self._tokens_per_s, 1),
            "backpressure_s": round(self._backpressure_total, 2),
            "last_weight_update_s": round(self._last_weight_update_s, 4),
            "served_version": self._served_version,
        }
