"""The command rank 0 broadcasts, and who may run the service: checked without a model.

The full loop (every rank stepping on the broadcast command) is exercised by
``test_distributed.py`` (two gloo ranks) and the in-process learner tests.
"""

from __future__ import annotations

import pickle

import pytest

from services.learner.command import Progress, StepCommand
from services.learner.data import TrainGroup
from services.learner.distributed import DistContext
from services.learner.loop import TrainingLoop

GROUP = TrainGroup("g", (1,), ((2, 3),), ((-0.5, -0.25),), (1.0,), (True,), 1.0, 4, 0)


def test_a_train_command_carries_its_groups_through_pickling():
    # broadcast_object pickles: what the other ranks receive must equal what rank 0 sent.
    command = StepCommand.train([GROUP, GROUP], wait_s=1.5)
    assert command.trains and command.groups == (GROUP, GROUP)
    assert pickle.loads(pickle.dumps(command)) == command


@pytest.mark.parametrize(
    ("kind", "groups"),
    [("train", ()), ("stop", (GROUP,)), ("finish", (GROUP,)), ("checkpoint", ())],
)
def test_malformed_commands_are_refused(kind, groups):
    with pytest.raises(ValueError):
        StepCommand(kind, groups)  # type: ignore[arg-type]


def test_stop_and_finish_do_not_train():
    assert not StepCommand("stop").trains and not StepCommand("finish").trains


def test_progress_is_a_value():
    p = Progress(step=3, version=3, margin_total=100)
    assert p == Progress(3, 3, 100) and hash(p) == hash(Progress(3, 3, 100))


def test_only_rank_zero_runs_the_service(learner_settings):
    settings = learner_settings()
    with pytest.raises(ValueError, match="rank 0"):
        TrainingLoop(settings, DistContext(rank=0, world_size=1))  # rank 0 without its service
    with pytest.raises(ValueError, match="rank 0"):
        TrainingLoop(settings, DistContext(rank=1, world_size=2), service=object())  # type: ignore[arg-type]
