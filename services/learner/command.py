"""What rank 0 tells every rank to do next: one ``StepCommand`` per iteration of the loop.

Rank 0's service decides (it alone reads Redis); the command is broadcast with
``DistContext.broadcast_object`` (pickled), and every rank then runs the same collectives for
it, so the ranks stay in step without any of them reading the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from services.learner.data import TrainGroup

__all__ = ["CommandKind", "Progress", "StepCommand"]

#: ``train``: one optimizer step on ``groups``; ``finish``: ``total_steps`` reached (final
#: checkpoint, push and evaluation); ``stop``: a stop request or the data timeout (a checkpoint
#: if anything is uncommitted, then exit idle).
CommandKind = Literal["train", "stop", "finish"]


@dataclass(frozen=True)
class StepCommand:
    kind: CommandKind
    groups: tuple[TrainGroup, ...] = ()
    #: seconds rank 0 waited to assemble ``groups`` (for the step's metrics)
    wait_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("train", "stop", "finish"):
            raise ValueError(f"unknown command {self.kind!r}")
        if (self.kind == "train") != bool(self.groups):
            raise ValueError(f"a {self.kind} command with {len(self.groups)} groups")

    @classmethod
    def train(cls, groups: list[TrainGroup], wait_s: float) -> StepCommand:
        return cls("train", tuple(groups), wait_s)

    @property
    def trains(self) -> bool:
        return self.kind == "train"


@dataclass(frozen=True)
class Progress:
    """Where training stands, as the loop tells rank 0's service: steps taken, the policy
    version they produced, and the horizon of the margin schedule (the first run's
    ``total_steps``, kept across resumes)."""

    step: int
    version: int
    margin_total: int
