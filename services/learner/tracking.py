"""Experiment trackers: Weights & Biases and TensorBoard, fed the records ``Metrics`` writes.

Both are optional (``pip install 'conspo[tracking]'``) and off by default; ``tracking`` in the
learner's settings lists the ones to use. Each tracker receives every train and eval record,
the same dict that goes to ``metrics.jsonl``, the api's curves, the Prometheus gauges and the
PNG, so every figure is in each (``train/<name>`` per step; ``eval/<set>/<metric>`` per
evaluation: greedy, avg@k, pass@k), and the run's settings are the tracker's config (the
learner's settings, secrets masked, plus the run name).

W&B: ``wandb_mode`` (or ``WANDB_MODE``) ``offline`` writes the run under ``<run_dir>/wandb``
for a later ``wandb sync``; ``online`` needs ``WANDB_API_KEY`` (or ``wandb login``). The W&B
run id is the conspo run name, resumed on restart, so a learner that comes back continues one
W&B run. TensorBoard: event files under ``tensorboard_dir`` (default ``<run_dir>/tensorboard``);
a restarted learner purges the events of the steps it is about to replay, as ``metrics.jsonl``
drops their records.

A tracker that fails never stops training: the error is logged once and the tracker is
switched off for the rest of the run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from conspo.settings import LearnerSettings

log = logging.getLogger(__name__)


class Tracker(Protocol):
    name: str

    def train(self, record: dict[str, Any]) -> None: ...

    def eval(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The record's figures: every int/float field (booleans and bookkeeping excluded)."""
    skip = {"step", "time", "version"}
    return {
        k: float(v)
        for k, v in record.items()
        if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)
    }


def eval_figures(record: dict[str, Any]) -> dict[str, float]:
    name = record.get("set", "eval")
    return {f"eval/{name}/{k}": v for k, v in numeric(record).items()}


def run_config(settings: LearnerSettings) -> dict[str, Any]:
    """The learner's settings as plain JSON (``SecretStr`` values dump as ``**********``)."""
    return json.loads(settings.model_dump_json())


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, config: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2) + "\n```")

    def train(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in numeric(record).items():
            self.writer.add_scalar(f"train/{key}", value, step)
        self.writer.flush()

    def eval(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in eval_figures(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, settings: LearnerSettings, config: dict[str, Any]) -> None:
        import wandb

        directory = Path(settings.wandb_dir or settings.run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.wandb_project,
            entity=settings.wandb_entity,
            mode=settings.wandb_mode,
            dir=str(directory),
            name=settings.run,
            id=settings.run,
            resume="allow",
            config=config,
        )

    def train(self, record: dict[str, Any]) -> None:
        figures = {f"train/{k}": v for k, v in numeric(record).items()}
        self.run.log(figures, step=int(record["step"]))

    def eval(self, record: dict[str, Any]) -> None:
        # An evaluation at step s is logged with the train record of step s (W&B steps only
        # increase): eval runs before that step's record is written.
        self.run.log(eval_figures(record), step=int(record["step"]), commit=False)

    def close(self) -> None:
        self.run.finish()


def build_trackers(settings: LearnerSettings, start_step: int) -> list[Tracker]:
    """The trackers ``settings.tracking`` names; a missing package is a clear error."""
    config = {"run": settings.run, "learner": run_config(settings)}
    trackers: list[Tracker] = []
    for name in dict.fromkeys(settings.tracking):
        try:
            if name == "tensorboard":
                log_dir = Path(settings.tensorboard_dir or settings.run_dir / "tensorboard")
                trackers.append(TensorBoardTracker(log_dir, config, start_step))
            elif name == "wandb":
                trackers.append(WandbTracker(settings, config))
        except ImportError as exc:
            raise RuntimeError(
                f"tracking={name!r} needs its package: pip install 'conspo[tracking]' ({exc})"
            ) from None
    return trackers


class Trackers:
    """Fan-out to the trackers; one that raises is logged and switched off."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.active = list(trackers)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.active):
            try:
                getattr(tracker, method)(*args)
            except Exception:
                log.exception("%s tracker failed in %s: switched off", tracker.name, method)
                self.active.remove(tracker)

    def train(self, record: dict[str, Any]) -> None:
        self._each("train", record)

    def eval(self, record: dict[str, Any]) -> None:
        self._each("eval", record)

    def close(self) -> None:
        self._each("close")
        self.active = []
