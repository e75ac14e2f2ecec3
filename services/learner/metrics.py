"""Where a step's numbers go: stderr (log line + tqdm bar), JSONL, Prometheus, Redis, PNG, and
the optional experiment trackers (W&B, TensorBoard: ``services.learner.tracking``).

``plot_every = 0`` turns the PNG off (it costs a matplotlib import and ~2 s per render on a busy
2-core CPU); otherwise it is redrawn every ``plot_every`` steps and once at exit.

One record per step (``kind: "train"``) and per evaluation (``kind: "eval"``) is appended to
``run_dir/metrics.jsonl``. After a restart the records of steps beyond the checkpoint (they are
about to be replayed) are dropped from the file and from the api's series, so every curve shows
each step once, with the values of the timeline that survived.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conspo.protocol import Verdict
from conspo.state import RunStore
from services.learner.batcher import Batch
from services.learner.plots import write_curves
from services.learner.step import StepStats
from services.learner.tracking import Tracker, Trackers

log = logging.getLogger(__name__)

_GAUGES = (
    "loss",
    "reward_mean",
    "accuracy",
    "informative_frac",
    "score_gap",
    "mean_p_pos",
    "margin",
    "entropy",
    "grad_norm",
    "lr",
    "tokens_per_s",
)
_SERIES_KEYS = (
    "step",
    "version",
    *_GAUGES,
    "dropped_frac",
    "staleness_mean",
    "staleness_max",
    "kl_ref",
    "wait_s",
    "fwd_bwd_s",
    "push_s",
    "step_s",
)


def step_record(
    step: int, version: int, batch: Batch, stats: StepStats, timings: dict[str, float]
) -> dict[str, Any]:
    """One step's numbers. Reward and accuracy are over the groups the step looked at that
    were not stale (trained + skipped), so an all-correct or all-wrong group still counts."""
    seen = [d.message for d in batch.train] + [x.delivery.message for x in batch.skipped]
    rewards = [r for g in seen for r in g.rewards]
    verdicts = [label.verdict for g in seen for label in g.labels]
    d = stats.diagnostics
    record: dict[str, Any] = {
        "step": step,
        "version": version,
        "loss": stats.loss,
        "reward_mean": sum(rewards) / max(1, len(rewards)),
        "accuracy": sum(v == Verdict.CORRECT for v in verdicts) / max(1, len(verdicts)),
        "informative_frac": len(batch.train) / max(1, len(seen)),
        "dropped_frac": len(batch.dropped) / max(1, batch.seen),
        "groups": stats.groups,
        "skipped": len(batch.skipped),
        "dropped": len(batch.dropped),
        "duplicates": batch.duplicates,
        "staleness": {str(k): v for k, v in sorted(batch.staleness.items())},
        "staleness_mean": sum(k * v for k, v in batch.staleness.items())
        / max(1, sum(batch.staleness.values())),
        "staleness_max": max(batch.staleness, default=0),
        "margin": stats.margin,
        "grad_norm": stats.grad_norm,
        "lr": stats.lr,
        "rows": stats.rows,
        "micro_batches": stats.micro_batches,
        "completion_tokens": stats.completion_tokens,
        "forward_tokens": stats.forward_tokens,
        "tokens_per_s": stats.forward_tokens / max(stats.seconds, 1e-9),
        "fwd_bwd_s": stats.seconds,
        "kl_ref": d.get("kl_ref", d.get("kl")),
    }
    # The objective's diagnostics (score gap, mean P+, clip fractions, KL, entropy, ...).
    record.update({k: v for k, v in d.items() if k not in record})
    record.update({f"{name}_s": seconds for name, seconds in timings.items()})
    record["step_s"] = stats.seconds + sum(v for k, v in timings.items() if k != "wait")
    return record


class Metrics:
    def __init__(
        self,
        run_dir: Path,
        registry: CollectorRegistry,
        store: RunStore | None,
        *,
        total_steps: int,
        progress_bar: bool = True,
        plot_every: int = 10,
        trackers: list[Tracker] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.png = self.run_dir / "curves.png"
        self.store = store
        self.total_steps = total_steps
        self.plot_every = plot_every
        self._plotted = (-1, -1)  # (train, eval) records drawn in the current PNG
        self.train_records: list[dict[str, Any]] = []
        self.eval_records: list[dict[str, Any]] = []
        self._bar = None
        self._progress_bar = progress_bar
        self.trackers = Trackers(trackers or [])
        g = {n: Gauge(f"learner_{n}", n.replace("_", " "), registry=registry) for n in _GAUGES}
        self.gauges = g
        self.step_gauge = Gauge("learner_step", "optimizer steps", registry=registry)
        self.version_gauge = Gauge("learner_policy_version", "policy version", registry=registry)
        self.groups = Counter("learner_groups", "groups by outcome", ["outcome"], registry=registry)
        self.phase = Histogram(
            "learner_step_phase_seconds",
            "seconds per step phase",
            ["phase"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.staleness = Histogram(
            "learner_staleness",
            "policy versions between sampling and training",
            buckets=(0, 1, 2, 3, 4, 6, 8, 16),
            registry=registry,
        )
        self.push_failures = Counter(
            "learner_push_failures", "failed weight pushes", registry=registry
        )
        self.eval_gauge = Gauge(
            "learner_eval_accuracy", "held-out accuracy", ["set", "metric"], registry=registry
        )

    # -- lifecycle --------------------------------------------------------------------------------
    def resume(self, step: int) -> None:
        """Keep only records up to ``step`` (later ones belong to a timeline being replayed)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                if int(rec.get("step", 0)) <= step:
                    kept.append(rec)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self.train_records = [r for r in kept if r.get("kind") == "train"]
        self.eval_records = [r for r in kept if r.get("kind") == "eval"]
        if self.store is not None:
            for series in ("train", "eval"):
                self._trim_series(series, step)
        disable = not (self._progress_bar and sys.stderr.isatty())
        if not disable:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps, initial=step, desc="learner", unit="step", leave=True
            )

    def _trim_series(self, series: str, step: int) -> None:
        assert self.store is not None
        points = self.store.series(series, last=10_000)
        keep = [p for p in points if p.get("step", 0) <= step]
        if len(keep) == len(points):
            return
        key = self.store.keys.metrics_series(series)
        pipe = self.store.client.pipeline(transaction=True)
        pipe.delete(key)
        if keep:
            pipe.rpush(key, *[json.dumps(p) for p in keep])
        pipe.execute()

    def close(self) -> None:
        self.trackers.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.plot_every:
            self.plot()

    # -- records ----------------------------------------------------------------------------------
    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def groups_seen(self, outcome: str, n: int) -> None:
        if n:
            self.groups.labels(outcome=outcome).inc(n)

    def train(self, record: dict[str, Any]) -> None:
        record = {"kind": "train", "time": time.time(), **record}
        self._append(record)
        self.train_records.append(record)
        for name, gauge in self.gauges.items():
            v = record.get(name)
            if isinstance(v, int | float):
                gauge.set(v)
        self.step_gauge.set(record["step"])
        self.version_gauge.set(record["version"])
        for phase in ("wait", "fwd_bwd", "push", "checkpoint", "eval"):
            v = record.get(f"{phase}_s")
            if isinstance(v, int | float):
                self.phase.labels(phase=phase).observe(v)
        for staleness, n in record.get("staleness", {}).items():
            for _ in range(int(n)):
                self.staleness.observe(float(staleness))
        if record.get("push_ok") is False:
            self.push_failures.inc()
        if self.store is not None:
            point = {k: record[k] for k in _SERIES_KEYS if isinstance(record.get(k), int | float)}
            self.store.append_point("train", point)
        self.trackers.train(record)
        log.info(
            "step %d/%d v%d loss %.4f reward %.3f acc %.3f informative %.2f gap %.4f "
            "P+ %.3f grad %.3f lr %.2e | wait %.2fs fwd/bwd %.2fs push %.2fs (%.0f tok/s)",
            record["step"],
            self.total_steps,
            record["version"],
            record.get("loss", float("nan")),
            record.get("reward_mean", float("nan")),
            record.get("accuracy", float("nan")),
            record.get("informative_frac", float("nan")),
            record.get("score_gap", float("nan")),
            record.get("mean_p_pos", float("nan")),
            record.get("grad_norm", float("nan")),
            record.get("lr", float("nan")),
            record.get("wait_s", 0.0),
            record.get("fwd_bwd_s", 0.0),
            record.get("push_s", 0.0),
            record.get("tokens_per_s", 0.0),
        )
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{record.get('loss', 0):.4f}", acc=f"{record.get('accuracy', 0):.3f}"
            )
        if self.plot_every and record["step"] % self.plot_every == 0:
            self.plot()

    def eval(self, record: dict[str, Any]) -> None:
        record = {"kind": "eval", "time": time.time(), **record}
        self._append(record)
        self.eval_records.append(record)
        for key, v in record.items():
            if key == "greedy" or key.startswith("avg@"):
                self.eval_gauge.labels(set=record.get("set", ""), metric=key).set(v)
        if self.store is not None:
            point = {k: v for k, v in record.items() if isinstance(v, int | float)}
            self.store.append_point("eval", point)
        self.trackers.eval(record)
        log.info(
            "eval at step %d on %s: %s",
            record["step"],
            record.get("set"),
            ", ".join(
                f"{k} {v:.3f}" for k, v in record.items() if k == "greedy" or k.startswith("avg@")
            ),
        )

    def plot(self) -> None:
        """Redraw ``curves.png`` unless it already shows every record."""
        drawn = (len(self.train_records), len(self.eval_records))
        if drawn == self._plotted:
            return
        self._plotted = drawn
        try:
            write_curves(self.train_records, self.eval_records, self.png)
        except Exception:  # a plot must never stop training
            log.exception("could not write %s", self.png)
