"""The batcher on its own, on a real Redis stream: its decisions are a function of the stream.

Resume determinism rests on ``Batcher``: a restarted learner replays its pending entries against
the checkpointed version and must take the same decisions. So the tests pin what a decision
depends on (stream position, version, LEARN markers) and what it must not depend on (how reads
are chunked, a restart in between), plus the edges of each rule: staleness exactly at the bound,
all-equal groups, duplicates, an incomplete batch put back in order, and held entries renewed.

No model is needed: groups are hand-made with one token per completion.
"""

from __future__ import annotations

import time

import pytest
import redis

from conspo.keys import Keys
from conspo.lineage import LEARN, learn_marker
from conspo.protocol import (
    Completion,
    Label,
    LabeledGroup,
    Prompt,
    RolloutGroup,
    SamplingParams,
    Verdict,
)
from conspo.queue import StreamQueue
from services.learner.batcher import DROPPED, SKIPPED, Batch, Batcher, Decided

CONSUMER = "learner-test-rank0"


def group(gid: str, *, version: int = 0, rewards: tuple[float, ...] = (1.0, 0.0)) -> LabeledGroup:
    completions = [
        Completion(token_ids=[5 + i], logprobs=[-0.5], text=str(i), finish_reason="stop")
        for i in range(len(rewards))
    ]
    labels = [Label(reward=r, verdict=Verdict.CORRECT if r > 0 else Verdict.WRONG) for r in rewards]
    rollout = RolloutGroup(
        group_id=gid,
        prompt=Prompt(prompt_id=f"p-{gid}", text="1+1=", answer="2"),
        prompt_token_ids=[1, 2],
        completions=completions,
        policy_version=version,
        sampling=SamplingParams(n=len(rewards), max_tokens=4),
    )
    return LabeledGroup(rollout=rollout, labels=labels)


@pytest.fixture
def queue(redis_client: redis.Redis, keys: Keys) -> StreamQueue[LabeledGroup]:
    q = StreamQueue(redis_client, keys, "labeled", LabeledGroup, visibility_timeout_s=60.0)
    q.ensure_group()
    return q


def publish(queue: StreamQueue[LabeledGroup], groups: list[LabeledGroup]) -> list[str]:
    return queue.publish_many([(g, g.group_id) for g in groups])


def batcher(queue: StreamQueue[LabeledGroup], **over) -> Batcher:
    kwargs = dict(batch_groups=2, max_staleness=1, block_ms=20)
    return Batcher(queue, CONSUMER, **{**kwargs, **over})


def take(b: Batcher, version: int, **kwargs) -> Batch:
    """One ``next_batch`` that gives up quickly once the stream has nothing more."""
    kwargs.setdefault("wait_timeout_s", 0.3)
    return b.next_batch(version, should_stop=lambda: False, **kwargs)


def decisions(batch: Batch) -> dict[str, list[str]]:
    return {
        "train": [d.message.group_id for d in batch.train],
        "skipped": [d.group_id for d in batch.skipped],
        "dropped": [d.group_id for d in batch.dropped],
    }


# A stream exercising every rule at version 3 with max_staleness 1: fresh (staleness 0), at the
# bound (1), past it (2), and all-equal rewards (skipped even when fresh).
MIXED = [
    group("a", version=3),
    group("b", version=1),  # staleness 2: dropped
    group("c", version=3, rewards=(1.0, 1.0)),  # all equal: skipped
    group("d", version=2),  # staleness 1 == max_staleness: trained
    group("e", version=0),  # dropped
    group("f", version=3, rewards=(0.0, 0.0)),  # skipped
    group("g", version=3),
    group("h", version=3),
]


def test_each_rule_decides_in_stream_order(queue):
    ids = publish(queue, MIXED)
    decided: list[Decided] = []
    b = batcher(queue)
    first = take(b, 3, on_decided=decided.append)
    assert first.complete
    assert decisions(first) == {"train": ["a", "d"], "skipped": ["c"], "dropped": ["b"]}
    assert [d.entry_id for d in first.train] == [ids[0], ids[3]]
    assert first.staleness == {0: 1, 1: 1}
    assert [d.marker for d in first.dropped] == [DROPPED]
    assert [d.marker for d in first.skipped] == [SKIPPED]
    # Skipped and dropped groups are reported the moment they are decided, in stream order.
    assert [(d.group_id, d.marker) for d in decided] == [("b", DROPPED), ("c", SKIPPED)]
    second = take(b, 4)  # the learner stepped: the version moved, staleness is measured anew
    assert decisions(second) == {"train": ["g", "h"], "skipped": ["f"], "dropped": ["e"]}
    assert second.staleness == {1: 2}
    assert second.seen == 4


@pytest.mark.parametrize("max_staleness", [0, 2])
def test_staleness_bound_is_inclusive(queue, max_staleness):
    # ``version - policy_version > max_staleness`` drops; equality trains (else
    # max_staleness=0 would never train anything).
    at, past = 5 - max_staleness, 4 - max_staleness
    publish(
        queue, [group("at", version=at), group("past", version=past), group("fresh", version=5)]
    )
    batch = take(batcher(queue, max_staleness=max_staleness), 5)
    assert decisions(batch) == {"train": ["at", "fresh"], "skipped": [], "dropped": ["past"]}


def test_uninformative_groups_train_when_not_skipped(queue):
    publish(queue, [group("same", rewards=(1.0, 1.0)), group("mixed")])
    batch = take(batcher(queue, skip_uninformative=False), 0)
    assert decisions(batch) == {"train": ["same", "mixed"], "skipped": [], "dropped": []}


@pytest.mark.parametrize("read_count", [1, 3, 100])
def test_decisions_do_not_depend_on_how_reads_are_chunked(queue, read_count):
    publish(queue, MIXED)
    b = batcher(queue, read_count=read_count)
    got = [decisions(take(b, 3)), decisions(take(b, 4))]
    assert got == [
        {"train": ["a", "d"], "skipped": ["c"], "dropped": ["b"]},
        {"train": ["g", "h"], "skipped": ["f"], "dropped": ["e"]},
    ]


def test_a_restart_replaying_pending_entries_takes_the_same_decisions(queue):
    publish(queue, MIXED[:4])
    before = batcher(queue)
    first = take(before, 3)
    later = publish(queue, MIXED[4:])  # arrives while the "crashed" learner was down
    # Nothing was acked (no checkpoint committed): a new batcher under the same stable consumer
    # name replays its own pending entries first, in stream order, then reads new ones.
    after = batcher(queue)
    pending = queue.read_own_pending(CONSUMER)
    assert [d.message.group_id for d in pending] == ["a", "b", "c", "d"]
    after.replay(pending)
    again = take(after, 3)
    assert decisions(again) == decisions(first)
    assert [d.entry_id for d in again.train] == [d.entry_id for d in first.train]
    rest = take(after, 4)
    assert decisions(rest) == {"train": ["g", "h"], "skipped": ["f"], "dropped": ["e"]}
    assert [d.delivery.entry_id for d in rest.dropped] == [later[0]]


def test_duplicates_are_acked_at_once_and_never_trained(queue, redis_client, keys):
    publish(queue, [group("done"), group("x"), group("x"), group("y")])
    # "done" was trained by an earlier incarnation: its LEARN marker is there.
    redis_client.set(keys.done(LEARN, "done"), learn_marker("trained", 1))
    b = batcher(queue)
    batch = take(b, 0)
    assert decisions(batch) == {"train": ["x", "y"], "skipped": [], "dropped": []}
    assert batch.duplicates == 2 and b.duplicates_total == 2
    # The duplicates are acked; the decided entries stay pending until their checkpoint.
    pending = queue.read_own_pending(CONSUMER)
    assert [d.message.group_id for d in pending] == ["x", "y"]


def test_an_incomplete_batch_is_put_back_in_order(queue):
    publish(queue, [group("a", version=2), group("stale", version=0), group("b", version=2)])
    b = batcher(queue, batch_groups=4)
    short = take(b, 2)  # a and b are trainable but the batch needs 4
    assert not short.complete
    assert short.train == [] and short.staleness == {}
    assert [d.group_id for d in short.dropped] == ["stale"]  # decided for good: reported
    publish(queue, [group("c", version=2), group("d", version=2)])
    full = take(b, 2)
    assert full.complete
    assert decisions(full) == {"train": ["a", "b", "c", "d"], "skipped": [], "dropped": []}


def test_stop_request_ends_the_batch_without_training(queue):
    publish(queue, [group("a")])
    b = batcher(queue)
    reads = []

    def should_stop() -> bool:
        reads.append(1)
        return len(reads) > 2

    batch = b.next_batch(0, should_stop=should_stop)
    assert not batch.complete and batch.train == []
    publish(queue, [group("b")])
    assert decisions(take(b, 0))["train"] == ["a", "b"]


def test_held_entries_are_renewed(queue, redis_client):
    publish(queue, [group("a"), group("b"), group("c")])
    b = batcher(queue)
    assert decisions(take(b, 0))["train"] == ["a", "b"]
    time.sleep(0.3)
    b.renew(every_s=0.0)
    rows = redis_client.xpending_range(queue.key, queue.group, "-", "+", 10)
    assert len(rows) == 3  # a, b decided and c buffered: all held, none acked
    assert max(r["time_since_delivered"] for r in rows) < 250  # reset by the renewal
    assert all(r["times_delivered"] == 1 for r in rows)  # JUSTID: not counted as a delivery


def test_reclaimed_entries_already_in_hand_are_ignored(redis_client, keys):
    # A visibility timeout shorter than the wait: every read reclaims our own held entries.
    queue = StreamQueue(
        redis_client, keys, "labeled", LabeledGroup, visibility_timeout_s=0.1, max_deliveries=1000
    )
    publish(queue, [group("a"), group("b"), group("c")])
    b = batcher(queue, batch_groups=4)
    short = take(b, 0, wait_timeout_s=0.8, renew_every_s=1e9)
    assert not short.complete
    time.sleep(0.2)
    assert queue.read(CONSUMER, count=10, block_ms=None)  # they are being handed back indeed
    publish(queue, [group("d")])
    full = take(b, 0, renew_every_s=1e9)
    # Each group once: a redelivery buffered twice would come out as a duplicate and be acked.
    assert decisions(full) == {"train": ["a", "b", "c", "d"], "skipped": [], "dropped": []}
    assert full.duplicates == 0 and b.duplicates_total == 0


def test_a_copy_marked_after_the_buffer_was_checked_is_still_a_duplicate(queue) -> None:
    # The done markers of a buffer are read in one round trip and cached: the learner's own marks
    # after that read must not be answered from the cache (release_held clears it).
    a, x = group("a"), group("x")
    publish(queue, [a, x, a])  # the third entry copies the first
    b = batcher(queue, batch_groups=1, max_staleness=0, skip_uninformative=False)

    first = take(b, 0, wait_timeout_s=5)
    assert decisions(first)["train"] == ["a"]
    queue.mark_and_ack([(first.train[0], "a", learn_marker("trained", 1))], stage=LEARN)
    b.release_held([first.train[0].entry_id], ["a"])

    second = take(b, 0, wait_timeout_s=5)
    assert decisions(second)["train"] == ["x"]
    assert b.duplicates_total == 0  # the copy is behind x in the buffer
    third = take(b, 0)
    assert not third.complete
    assert third.duplicates == 1 and b.duplicates_total == 1  # not trained again
