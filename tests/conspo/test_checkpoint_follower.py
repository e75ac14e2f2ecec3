"""The checkpoint transport's follower: every announced checkpoint is staged once, from real
files and a real Redis, without the follower ever joining the learner's group."""

from __future__ import annotations

import time

import torch

from conspo.models.tiny import build_tiny_model, save_model
from conspo.protocol import WeightAnnouncement
from conspo.testing import wait_for
from conspo.weight_sync import (
    CheckpointFollower,
    Follower,
    LocalReceiver,
    StagedWeights,
    read_members,
    served_versions,
)
from conspo.weight_sync.membership import write_announcement

TIMEOUT = 30.0


def take(follower: Follower) -> StagedWeights:
    taken: list[StagedWeights | None] = []
    assert wait_for(lambda: taken.append(follower.take_staged()) or taken[-1], TIMEOUT)
    staged = taken[-1]
    assert staged is not None
    return staged


def announce(client, keys, version: int, path: str | None) -> None:
    transport = "checkpoint" if path else "broadcast"
    ann = WeightAnnouncement(version=version, step=version, transport=transport,
                             checkpoint_path=path)  # fmt: skip
    write_announcement(client, keys, ann)


def test_each_announced_checkpoint_is_staged_once(redis_client, keys, tmp_path):
    served, tokenizer = build_tiny_model(seed=0)
    pushed, _ = build_tiny_model(seed=1)
    path = save_model(pushed, tokenizer, tmp_path / "v1")
    follower = CheckpointFollower(redis_client, keys, "gen-tp", LocalReceiver(served), poll_s=0.05)
    follower.start()
    try:
        announce(redis_client, keys, 1, str(path))
        staged = take(follower)
        assert (staged.version, staged.source) == (1, "checkpoint")
        for name, p in pushed.named_parameters():
            assert torch.equal(staged.tensors[name], p.detach()), name
        time.sleep(0.3)  # the same announcement, polled again: nothing new
        assert follower.take_staged() is None
        assert follower.latest_announcement().version == 1

        announce(redis_client, keys, 2, None)  # a broadcast it cannot take: seen, not staged
        assert wait_for(lambda: follower.latest_announcement().version == 2, TIMEOUT)
        assert follower.take_staged() is None

        announce(redis_client, keys, 3, str(tmp_path / "gone"))
        assert wait_for(lambda: follower.last_error is not None, TIMEOUT)
        assert "v3" in follower.last_error and follower.take_staged() is None

        announce(redis_client, keys, 4, str(path))
        assert take(follower).version == 4
        assert follower.last_error is None  # a staged version clears the last failure

        follower.report_served(4)
        assert served_versions(redis_client, keys) == {"gen-tp": 4}
        assert read_members(redis_client, keys) == {}  # never a member of the group
    finally:
        follower.close()
