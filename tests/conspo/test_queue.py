"""The Redis Streams layer against a real Redis, with real consumer processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from conspo.keys import Keys
from conspo.protocol import DeadLetter, Prompt, decode
from conspo.queue import (
    RELEASED,
    Backlog,
    Commit,
    StreamQueue,
    depths,
    parse_entry_id,
    previous_entry_id,
)
from conspo.testing import wait_for

WORKER = Path(__file__).with_name("queue_worker.py")


def prompt(i: int) -> Prompt:
    return Prompt(
        prompt_id=f"p-{i}", text=f"{i}+{i}=", answer=str(2 * i), verifier="arith", created_at=1.0
    )


def queues(client: redis.Redis, keys: Keys, **kw) -> tuple[StreamQueue, StreamQueue]:
    return (
        StreamQueue(client, keys, "prompts", Prompt, **kw),
        StreamQueue(client, keys, "rollouts", Prompt),
    )


def dead_letters(client: redis.Redis, keys: Keys) -> list[DeadLetter]:
    return [decode(f[b"d"], DeadLetter) for _, f in client.xrange(keys.dead)]


def start_worker(mode: str, url: str, run: str, visibility: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), mode, url, run, str(visibility)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_entry_of_a_killed_consumer_is_delivered_to_another(redis_client, redis_url, keys):
    src, _ = queues(redis_client, keys, visibility_timeout_s=0.5)
    entry = src.publish(prompt(1), "p-1")
    proc = start_worker("hold", redis_url, keys.run, 0.5)
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"GOT {entry}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert src.read("other", count=1, block_ms=10) == []  # still inside its visibility timeout
    time.sleep(0.6)
    got = src.read("other", count=1, block_ms=10)
    assert [(d.entry_id, d.message, d.deliveries) for d in got] == [(entry, prompt(1), 2)]


def test_failing_entry_lands_in_dead_letters_with_its_reason(redis_client, keys):
    src, _ = queues(redis_client, keys, max_deliveries=3, visibility_timeout_s=30)
    entry = src.publish(prompt(2), "p-2")
    deliveries = []
    for _ in range(5):
        got = src.read("c", count=1, block_ms=10)
        if not got:
            break
        deliveries.append(got[0].deliveries)
        src.fail(got[0], f"sympy exploded on try {got[0].deliveries}")
    assert deliveries == [1, 2, 3]
    [letter] = dead_letters(redis_client, keys)
    assert (letter.entry_id, letter.source, letter.deliveries) == (entry, "prompts", 3)
    assert letter.reason == "sympy exploded on try 3"
    assert decode(letter.payload, Prompt) == prompt(2)
    assert src.backlog().outstanding == 0


def test_entry_whose_consumers_keep_dying_is_dead_lettered(redis_client, keys):
    src, _ = queues(redis_client, keys, max_deliveries=2, visibility_timeout_s=0.05)
    src.publish(prompt(3), "p-3")
    seen = []
    for consumer in ("a", "b", "c", "d"):
        time.sleep(0.06)
        seen += [d.deliveries for d in src.read(consumer, count=1, block_ms=10)]
    assert seen == [1, 2]  # the third delivery is refused and dead-lettered instead
    [letter] = dead_letters(redis_client, keys)
    assert "gave up after 2 deliveries" in letter.reason
    assert src.backlog().outstanding == 0


def test_undecodable_entry_is_dead_lettered_not_returned(redis_client, keys):
    src, _ = queues(redis_client, keys)
    src.ensure_group()
    bad = redis_client.xadd(keys.prompts, {"k": "p-x", "d": b"\x93garbage"}).decode()
    good = src.publish(prompt(4), "p-4")
    got = src.read("c", count=10, block_ms=10)
    assert [d.entry_id for d in got] == [good]
    [letter] = dead_letters(redis_client, keys)
    assert letter.entry_id == bad and letter.reason.startswith("undecodable")


def test_duplicate_delivery_of_a_group_produces_one_output(redis_client, keys):
    src, dst = queues(redis_client, keys)
    src.publish(prompt(5), "group-5")
    src.publish(prompt(5), "group-5")  # the same group delivered twice
    got = src.read("c", count=10, block_ms=10)
    assert len(got) == 2
    results = [
        src.commit(
            d,
            stage="verify",
            item=d.key,
            outputs=[(dst, d.message, d.key)],
            counters={"verifier.groups": 1, "verifier.completions": 8},
        )
        for d in got
    ]
    assert [fresh for _, fresh in results] == [True, False]
    assert results[0][0] == results[1][0]  # the marker points at the one output entry
    assert redis_client.xlen(keys.rollouts) == 1
    assert src.backlog().outstanding == 0  # both deliveries acked
    counters = redis_client.hgetall(keys.counters)
    assert counters == {b"verifier.groups": b"1", b"verifier.completions": b"8"}


def test_publish_once_is_idempotent(redis_client, keys):
    src, _ = queues(redis_client, keys)
    first = src.publish_once(prompt(6), "k6", stage="api")
    again = src.publish_once(prompt(6), "k6", stage="api")
    assert first[1] is True and again == (first[0], False)
    assert redis_client.xlen(keys.prompts) == 1


def test_trim_never_drops_unacknowledged_entries(redis_client, keys):
    src, _ = queues(redis_client, keys)
    ids = [e for e in src.publish_many([(prompt(i), f"p-{i}") for i in range(10)])]
    got = src.read("c", count=6, block_ms=10)
    src.ack(*got[:2], got[3])  # entry 2 stays pending, 6..9 were never read
    removed = src.trim()
    assert removed == 2
    remaining = [i.decode() for i, _ in redis_client.xrange(keys.prompts)]
    assert remaining == ids[2:]
    src.ack(*got)
    assert src.trim() == 4  # now everything read is acked: 6..9 (unread) stay
    assert [i.decode() for i, _ in redis_client.xrange(keys.prompts)] == ids[6:]
    assert [d.entry_id for d in src.read("c", count=10, block_ms=10)] == ids[6:]


def test_trim_keeps_the_newest_entries_when_asked(redis_client, keys):
    src, _ = queues(redis_client, keys)
    ids = src.publish_many([(prompt(i), f"p-{i}") for i in range(10)])
    src.ack(*src.read("c", count=10, block_ms=10))
    assert src.trim(keep_last=4) == 6
    assert [i.decode() for i, _ in redis_client.xrange(keys.prompts)] == ids[6:]


def test_backlog_counts_lag_and_pending(redis_client, keys):
    src, _ = queues(redis_client, keys)
    src.publish_many([(prompt(i), f"p-{i}") for i in range(7)])
    got = src.read("c", count=3, block_ms=10)
    src.ack(got[0])
    b = src.backlog()
    assert (b.length, b.pending, b.lag, b.outstanding) == (7, 2, 4, 6)


def test_release_hands_entries_back_immediately(redis_client, keys):
    src, _ = queues(redis_client, keys, visibility_timeout_s=3600)
    src.publish(prompt(7), "p-7")
    [d] = src.read("stopping", count=1, block_ms=10)
    src.release(d)
    [again] = src.read("other", count=1, block_ms=10)
    assert again.entry_id == d.entry_id and again.deliveries == 2


def test_read_own_pending_recovers_a_restarted_consumer(redis_client, keys):
    src, _ = queues(redis_client, keys)
    src.publish_many([(prompt(i), f"p-{i}") for i in range(5)])
    first = src.read("learner-0", count=3, block_ms=10)
    src.ack(first[1])
    again = src.read_own_pending("learner-0")
    assert [d.entry_id for d in again] == [first[0].entry_id, first[2].entry_id]
    assert [d.deliveries for d in again] == [2, 2]


def test_ten_thousand_entries_three_consumers_exactly_once(redis_client, redis_url, keys):
    n = 10_000
    src, _ = queues(redis_client, keys)
    workers = [start_worker("relay", redis_url, keys.run, 1.0) for _ in range(3)]
    try:
        for start in range(0, n, 1000):
            src.publish_many([(prompt(i), f"p-{i}") for i in range(start, start + 1000)])
        # kill one consumer mid-run and start a replacement: its pending entries are reclaimed
        assert wait_for(lambda: redis_client.xlen(keys.rollouts) > n // 4, timeout=60)
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(timeout=10)
        workers[0] = start_worker("relay", redis_url, keys.run, 1.0)
        assert wait_for(lambda: redis_client.xlen(keys.rollouts) >= n, timeout=120)
        assert wait_for(lambda: src.backlog().outstanding == 0, timeout=30)
    finally:
        redis_client.hset(keys.state, "stop", "1")
        for w in workers:
            try:
                w.wait(timeout=10)
            except subprocess.TimeoutExpired:
                w.kill()
    out = [f[b"k"].decode() for _, f in redis_client.xrange(keys.rollouts)]
    assert len(out) == n
    assert sorted(out) == sorted(f"p-{i}" for i in range(n))
    assert redis_client.xlen(keys.dead) == 0


@pytest.mark.parametrize("bad", [0, -5])
def test_read_without_blocking_returns_immediately(redis_client, keys, bad):
    src, _ = queues(redis_client, keys)
    t = time.monotonic()
    assert src.read("c", count=1, block_ms=bad) == []
    assert time.monotonic() - t < 0.5


def test_mark_and_ack_records_markers_and_tallies(redis_client, keys):
    src, _ = queues(redis_client, keys)
    src.publish_many([(prompt(i), f"g-{i}") for i in range(3)])
    got = src.read("learner", count=3, block_ms=10)
    src.mark_and_ack([(d, d.key, "trained:1") for d in got], stage="learn")
    assert src.backlog().outstanding == 0
    assert redis_client.get(keys.done("learn", "g-1")) == b"trained:1"
    src.mark_and_ack([(got[0], got[0].key, "trained:2")], stage="learn")  # a duplicate commit
    assert redis_client.hgetall(keys.tally("learn")) == {b"g-0": b"2", b"g-1": b"1", b"g-2": b"1"}


def test_commit_many_is_one_commit_per_item(redis_client, keys):
    src, dst = queues(redis_client, keys)
    src.publish_many([(prompt(i), f"g-{i % 3}") for i in range(5)])  # g-0 and g-1 twice
    got = src.read("c", count=5, block_ms=10)
    src.fail(got[4], "a previous attempt failed")  # leaves a failure record to clear
    got[4] = src.read("c", count=1, block_ms=10)[0]
    results = src.commit_many(
        [
            Commit(
                d,
                stage="verify",
                item=d.key,
                outputs=[(dst, d.message, d.key)],
                counters={"verifier.groups": 1},
            )
            for d in got
        ]
    )
    assert [fresh for _, fresh in results] == [True, True, True, False, False]
    assert results[3][0] == results[0][0]
    assert redis_client.xlen(keys.rollouts) == 3
    assert redis_client.hget(keys.counters, "verifier.groups") == b"3"
    assert src.backlog().outstanding == 0
    assert redis_client.hlen(keys.failures) == 0


def test_a_stream_not_created_yet_is_empty_and_errors_name_the_stream(redis_client, keys):
    q, _ = queues(redis_client, keys)
    assert q.trim() == 0 and q.forget_dead(lambda _: False, me="c") == 0  # nothing to do
    assert not redis_client.exists(q.key)  # and nothing was created by looking
    redis_client.set(q.key, "not a stream")
    with pytest.raises(redis.ResponseError, match=rf"^stream {q.key}: WRONGTYPE"):
        q.backlog()
    redis_client.delete(q.key)
    q.publish(prompt(1), "p-1")
    redis_client.delete(q.key)  # stream and group gone under a consumer that had made them
    with pytest.raises(redis.ResponseError, match="NOGROUP"):
        q.read("c", block_ms=None)  # once; then the group is made again
    q.publish(prompt(2), "p-2")
    assert [d.key for d in q.read("c", block_ms=None)] == ["p-2"]


def test_entries_of_a_gone_consumer_are_handed_back_at_once(redis_client, keys):
    q, _ = queues(redis_client, keys, visibility_timeout_s=600)
    for i in range(4):
        q.publish(prompt(i), f"p-{i}")
    assert len(q.read("dead-1", count=2, block_ms=None)) == 2
    assert len(q.read("alive-1", count=1, block_ms=None)) == 1
    assert q.read("me", count=1, block_ms=None)[0].key == "p-3"
    # Ten minutes of visibility timeout: nothing would come back by itself.
    assert q.read("me", count=4, block_ms=None) == []
    assert q.release_dead(lambda name: name == "alive-1", me="me") == 2
    again = q.read("me", count=4, block_ms=None)
    assert sorted(d.key for d in again) == ["p-0", "p-1"]
    assert [d.deliveries for d in again] == [2, 2]  # a redelivery, counted as such
    assert q.release_dead(lambda name: name == "alive-1", me="me") == 0  # "me" is never gone


def test_readers_see_entries_without_touching_raw_fields(redis_client, keys):
    q, _ = queues(redis_client, keys)
    ids = [q.publish(prompt(i), f"p-{i}") for i in range(5)]
    redis_client.xadd(q.key, {"k": "junk", "d": b"\x00not msgpack"})
    entries = list(q.entries())
    assert [e.entry_id for e in entries[:5]] == ids
    assert [e.message.prompt_id for e in entries[:5]] == [f"p-{i}" for i in range(5)]
    assert entries[5].message is None and "msgpack" in entries[5].error
    got = q.get(ids[2])
    assert got is not None and got.key == "p-2" and got.message.answer == "4"
    assert q.get("1-1") is None
    newest = q.newest(2)
    assert [e.key for e in newest] == ["junk", "p-4"]
    assert [e.key for e in q.newest(10, before=ids[2])] == ["p-1", "p-0"]
    assert q.newest(10, before="0-0") == []
    assert q.entry_keys([ids[0], ids[3], "1-1"]) == {ids[0]: "p-0", ids[3]: "p-3"}


def test_pending_and_unfinished_follow_the_group(redis_client, keys):
    q, _ = queues(redis_client, keys)
    assert q.pending() == {} and q.unfinished() == set() and q.depth() == Backlog(0, 0, 0)
    assert not redis_client.exists(q.key)  # reading created nothing
    ids = [q.publish(prompt(i), f"p-{i}") for i in range(4)]
    assert q.unfinished() == set(ids)  # nothing delivered yet
    first, second = q.read("c1", count=2, block_ms=None)
    q.ack(first)
    assert q.pending() == {second.entry_id: "c1"}
    assert q.unfinished() == {second.entry_id, ids[2], ids[3]}
    assert q.depth() == Backlog(length=4, pending=1, lag=2)
    other = StreamQueue(redis_client, keys, "rollouts", Prompt)
    assert depths([q, other]) == [Backlog(4, 1, 2), Backlog(0, 0, 0)]
    assert not redis_client.exists(other.key)


def test_entry_ids_as_clients_send_them():
    assert parse_entry_id("12-3") == (12, 3)
    assert parse_entry_id("12") is None and parse_entry_id(f"{2**64}-0") is None
    assert previous_entry_id("12-3") == "12-2"
    assert previous_entry_id("12-0") == f"11-{2**64 - 1}"
    assert previous_entry_id("0-0") is None and previous_entry_id("x") is None


def consumers(client: redis.Redis, q: StreamQueue) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in client.xinfo_consumers(q.key, q.group)}


def test_gone_consumers_leave_the_group_once_they_hold_nothing(redis_client, keys):
    q, _ = queues(redis_client, keys, visibility_timeout_s=600)
    for i in range(5):
        q.publish(prompt(i), f"p-{i}")
    q.ack(*q.read("gone-idle", count=1, block_ms=None))  # finished its work, then died
    held = q.read("gone-busy", count=2, block_ms=None)  # died holding two entries
    q.read("alive-1", count=1, block_ms=None)
    q.read("me", count=1, block_ms=None)
    alive = {"alive-1"}.__contains__
    assert q.forget_dead(alive, me="me") == 1  # only the one that holds nothing
    assert consumers(redis_client, q) == {"gone-busy": 2, "alive-1": 1, "me": 1}
    assert q.release_dead(alive, me="me") == 2
    assert q.forget_dead(alive, me="me") == 1
    # The handed-back entries wait with the pseudo-consumer, which is never removed.
    assert consumers(redis_client, q) == {RELEASED: 2, "alive-1": 1, "me": 1}
    again = q.read("me", count=5, block_ms=None)
    assert sorted(d.entry_id for d in again) == sorted(d.entry_id for d in held)  # nothing lost
    assert q.forget_dead(alive, me="me") == 0


def test_a_consumer_holding_entries_is_never_removed_whatever_the_caller_saw(
    redis_client, keys, monkeypatch
):
    """The check and the removal are one script: a consumer that read entries after the list of
    gone consumers was taken (pending 0 there) keeps them."""
    q, _ = queues(redis_client, keys)
    q.publish(prompt(1), "p-1")
    (d,) = q.read("late-reader", count=1, block_ms=None)
    monkeypatch.setattr(q, "_gone", lambda alive, me: [("late-reader", 0)])  # a stale view
    assert q.forget_dead(lambda _: False, me="me") == 0
    assert q.pending() == {d.entry_id: "late-reader"}
