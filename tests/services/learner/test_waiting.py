"""A learner that cannot step says why, and releases what it will never train.

``WaitStats.explain`` is checked on its own (codes, numbers); the learner is then run in-process
on real Redis: a stream of all-equal groups is counted, explained and released (acked, the stream
trimmed) within ``waiting_after_s`` plus one read, without any step or checkpoint; a crash between
the ledger and its ack is repaired by the next start; an empty run explains itself with the
queues upstream.
"""

from __future__ import annotations

import threading
import time

from conspo.flow import CONSUMED
from conspo.lineage import LEARN
from conspo.protocol import Label, LabeledGroup, Verdict
from conspo.queue import StreamQueue
from conspo.redis_conn import connect
from conspo.settings import LearnerSettings
from conspo.state import RunStore
from conspo.testing import wait_for
from services.learner.batcher import DROPPED, SKIPPED, Decided
from services.learner.checkpoint import CheckpointManager
from services.learner.distributed import DistContext
from services.learner.loop import TrainingLoop
from services.learner.main import build_learner
from services.learner.waiting import WaitStats

WAIT_S = 1.0
# The bound under test is WAIT_S; the slack covers one XREADGROUP block (200 ms here) and a
# 2-core machine shared with other test runs, where a thread may not be scheduled for seconds.
SLACK_S = 6.0


def _decided(group: LabeledGroup, marker: str) -> Decided:
    from conspo.queue import Delivery

    return Decided(Delivery("1-0", group.group_id, group, 1, b""), group.group_id, marker)


def _no_answer(group: LabeledGroup) -> LabeledGroup:
    labels = [Label(reward=0.0, verdict=Verdict.NO_ANSWER) for _ in group.labels]
    return group.model_copy(update={"labels": labels})


def _explain(stats: WaitStats, in_hand: int = 0, idle_s: float = 0.0) -> tuple[str, str]:
    return stats.explain(
        in_hand=in_hand,
        batch_groups=8,
        idle_s=idle_s,
        quiet_after_s=10.0,
        version=7,
        max_staleness=1,
        upstream=lambda: "UPSTREAM",
    )


def test_explain_names_the_cause_with_its_numbers(groups_factory):
    zeros = [_no_answer(g) for g in groups_factory(3, pattern=lambda i: [False] * 4)]
    ones = groups_factory(1, prefix="o", pattern=lambda i: [True] * 4)
    stale = groups_factory(2, prefix="s", version=lambda i: 3 + i)

    stats = WaitStats()
    assert _explain(stats) == ("no_data", "no labelled group has arrived in 0 s (UPSTREAM)")

    for g in zeros:
        stats.saw(_decided(g, SKIPPED))
    code, reason = _explain(stats, in_hand=2)
    assert code == "all_equal_rewards"
    assert reason == (
        "last 3 groups had equal rewards (all 0: verdicts no_answer 12): no contrast to train "
        "on; 2 of 8 groups to train in hand"
    )
    stats.saw(_decided(ones[0], SKIPPED))
    assert "(all 0 in 3, all 1 in 1: verdicts no_answer 12, correct 4)" in _explain(stats)[1]

    stats = WaitStats()
    for g in stale:
        stats.saw(_decided(g, DROPPED))
    assert _explain(stats) == (
        "stale",
        "last 2 groups arrived too stale to train on (sampled with v3..v4, the learner is at "
        "v7, max_staleness 1)",
    )
    # Mostly trainable groups: filling while they come, no_data once they stop coming.
    assert _explain(stats, in_hand=5, idle_s=3)[0] == "filling"
    code, reason = _explain(stats, in_hand=5, idle_s=30)
    assert code == "no_data"
    assert reason.startswith("5 of 8 groups to train in hand; last 2 groups arrived too stale")
    assert reason.endswith("the last labelled group arrived 30 s ago; UPSTREAM")


def _settings(learner_settings, **over) -> LearnerSettings:
    quick = dict(
        plot_every=0,
        batch_groups=2,
        total_steps=1,
        checkpoint_every=1,
        wait_timeout_s=0,
        waiting_after_s=WAIT_S,
        retain_entries=0,
        eval_every=0,
    )
    return learner_settings(**{**quick, **over})


class _Running:
    """A learner's ``run`` in a thread, stoppable."""

    def __init__(self, learner: TrainingLoop) -> None:
        self.learner = learner
        self.stop = threading.Event()
        self.result: list[object] = []
        learner.service.stop_requested = self.stop.is_set
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result.append(self.learner.run())
        except BaseException as exc:  # handed to the test, a crash included
            self.result.append(exc)

    def join(self, timeout: float) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the learner did not return"
        return self.result[0]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        self.learner.close()


def test_all_equal_stream_is_counted_explained_and_released_within_the_bound(
    redis_url, redis_client, run_name, keys, tmp_path, groups_factory, caplog, learner_settings
):
    caplog.set_level("INFO", logger="services.learner.service")
    zeros = [_no_answer(g) for g in groups_factory(40, pattern=lambda i: [False] * 4)]
    queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    queue.publish_many([(g, g.group_id) for g in zeros])
    settings = _settings(learner_settings)
    learner = build_learner(settings, DistContext(), client=connect(redis_url))
    store = RunStore(redis_client, keys)
    started = time.time()
    running = _Running(learner)
    try:

        def explained_and_released() -> bool:
            waiting = store.waiting()
            backlog = queue.backlog()
            return (
                waiting is not None
                and "last 40 groups" in waiting.reason
                and backlog.pending == 0
                and backlog.lag == 0
            )

        assert wait_for(explained_and_released, WAIT_S + SLACK_S), (
            store.waiting(),
            queue.backlog(),
            store.counters(),
        )
        assert time.time() - started <= WAIT_S + SLACK_S
        waiting = store.waiting()
        assert waiting is not None
        assert (waiting.service, waiting.code) == ("learner", "all_equal_rewards")
        assert waiting.reason.startswith(
            "last 40 groups had equal rewards (all 0: verdicts no_answer 160): no contrast to "
            "train on"
        )  # then, once nothing arrived for WAIT_S: "; the last labelled group arrived 1 s ago"
        assert started - 1 <= waiting.since <= started + WAIT_S + SLACK_S
        counters = store.counters()
        assert counters["learner.groups_skipped"] == 40
        assert counters[CONSUMED] == 40
        assert store.fields()["step"] == "0"
        # Released: marked, acked and trimmed, with no step and no checkpoint behind it.
        assert all(
            redis_client.get(keys.done(LEARN, g.group_id)) == SKIPPED.encode() for g in zeros
        )
        assert redis_client.xlen(keys.labeled) == 0
        ckpts = CheckpointManager(tmp_path / run_name / "checkpoints", keep=3)
        assert ckpts.list() == []
        ledger = ckpts.read_ledger(-1)
        assert ledger is not None and ledger.consumed == 40 and ledger.records
        assert "(all_equal_rewards): last 40 groups had equal rewards" in caplog.text

        # Groups with contrast arrive: the step happens and the explanation is gone.
        informative = groups_factory(2, prefix="b")
        queue.publish_many([(g, g.group_id) for g in informative])
        assert running.join(120) == "finished"
        assert store.waiting() is None
        assert [redis_client.get(keys.done(LEARN, g.group_id)) for g in informative] == [
            b"trained:1"
        ] * 2
        ckpt = ckpts.latest()
        assert ckpt is not None
        assert [r.group_id for r in ckpt.state.records] == [g.group_id for g in informative]
        assert ckpt.state.counters["groups_skipped"] == 40
        assert ckpt.state.consumed_total == 42
        assert ckpts.read_ledger(ckpt.state.seq) is None  # absorbed by the checkpoint
        assert not ckpts.ledger_path.exists()
        assert store.counters()[CONSUMED] == 42
    finally:
        running.close()


class _Crash(BaseException):
    """Stands in for SIGKILL: unwinds the learner without any of its clean-up."""


def test_a_crash_between_the_ledger_and_its_ack_is_repaired_at_the_next_start(
    redis_url, redis_client, run_name, keys, tmp_path, groups_factory, monkeypatch,
    learner_settings,
):  # fmt: skip
    queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    first = groups_factory(2, prefix="a")
    same = groups_factory(6, prefix="s", pattern=lambda i: [True] * 4)
    queue.publish_many([(g, g.group_id) for g in [*first, *same]])
    settings = _settings(learner_settings, total_steps=2)
    learner = build_learner(settings, DistContext(), client=connect(redis_url))
    ckpts = CheckpointManager(tmp_path / run_name / "checkpoints", keep=3)
    real = StreamQueue.mark_and_ack

    def crash_on_release(self, items, *, stage):
        if any(marker == SKIPPED for _, _, marker in items):
            raise _Crash("killed after the ledger, before the ack")
        return real(self, items, stage=stage)

    monkeypatch.setattr(StreamQueue, "mark_and_ack", crash_on_release)
    running = _Running(learner)
    try:
        assert isinstance(running.join(60), _Crash)
    finally:
        learner.close()
    monkeypatch.setattr(StreamQueue, "mark_and_ack", real)
    ckpt = ckpts.latest()
    assert ckpt is not None and ckpt.state.step == 1
    ledger = ckpts.read_ledger(ckpt.state.seq)
    assert ledger is not None and len(ledger.records) == 6 and ledger.consumed == 6
    assert queue.backlog().pending == 6  # written down, not acked

    # The restart acks what the ledger covers, counts it once, and trains on.
    restarted = build_learner(settings, DistContext(), client=connect(redis_url))
    assert queue.backlog().pending == 0
    store = RunStore(redis_client, keys)
    assert store.counters()[CONSUMED] == 8
    assert store.counters()["learner.groups_skipped"] == 6
    running = _Running(restarted)
    try:
        queue.publish_many([(g, g.group_id) for g in groups_factory(2, prefix="b", version=1)])
        assert running.join(120) == "finished"
    finally:
        running.close()
    tally = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.tally(LEARN)).items()}
    assert len(tally) == 10 and set(tally.values()) == {1}
    assert all(redis_client.get(keys.done(LEARN, g.group_id)) == SKIPPED.encode() for g in same)
    final = ckpts.latest()
    assert final is not None and final.state.step == 2
    assert final.state.counters["groups_skipped"] == 6
    assert final.state.consumed_total == 10


def test_no_data_is_explained_with_the_queues_upstream(
    redis_url, redis_client, keys, learner_settings
):
    settings = _settings(learner_settings)
    learner = build_learner(settings, DistContext(), client=connect(redis_url))
    store = RunStore(redis_client, keys)
    running = _Running(learner)
    try:
        assert wait_for(lambda: store.waiting() is not None, WAIT_S + SLACK_S)
        waiting = store.waiting()
        assert waiting is not None and waiting.code == "no_data"
        assert waiting.reason.startswith("no labelled group has arrived in ")
        assert waiting.reason.endswith(
            "(prompts: 0 queued, 0 being generated; rollouts: 0 queued, 0 being verified; "
            "alive: 0 generator(s), 0 verifier(s); nothing is queued upstream: submit prompts "
            "or a dataset)"
        )
    finally:
        running.close()
    assert store.waiting() is None  # a stopped learner is not waiting any more
