"""The learner loop in-process on real Redis: what it trains, skips, drops and acks."""

from __future__ import annotations

import json
import threading

from conspo.flow import CONSUMED
from conspo.lineage import LEARN
from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.redis_conn import connect
from conspo.settings import LearnerSettings
from conspo.state import RunStore
from conspo.testing import wait_for
from services.learner.checkpoint import CheckpointManager
from services.learner.distributed import DistContext
from services.learner.main import build_learner


def _settings(learner_settings, **over) -> LearnerSettings:
    return learner_settings(**{"wait_timeout_s": 10, "plot_every": 2, **over})


def test_stale_and_all_equal_groups_are_counted_and_marked(
    redis_url, redis_client, keys, tmp_path, run_name, groups_factory, learner_settings
):
    step1 = groups_factory(2, prefix="a")  # version 0: trained in step 1
    same = groups_factory(1, prefix="s", version=1, pattern=lambda i: [False] * 4)
    stale = groups_factory(1, prefix="d", version=0)  # at learner version 1: staleness 1 > 0
    step2 = groups_factory(2, prefix="b", version=1, seed=1)
    stream = [*step1, *same, *stale, step1[0], *step2]  # step1[0] again: a duplicate
    queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    queue.publish_many([(g, g.group_id) for g in stream])

    settings = _settings(
        learner_settings,
        batch_groups=2,
        max_staleness=0,
        total_steps=2,
        checkpoint_every=1,
        eval_every=2,
        eval_samples=6,
        eval_k=2,
    )
    client = connect(redis_url)
    learner = build_learner(settings, DistContext(), client=client)
    try:
        assert learner.run() == "finished"
    finally:
        learner.close()

    marker = lambda g: redis_client.get(keys.done(LEARN, g.group_id)).decode()  # noqa: E731
    assert [marker(g) for g in step1] == ["trained:1", "trained:1"]
    assert marker(same[0]) == "skipped:all_equal"
    assert marker(stale[0]) == "dropped:stale"
    assert [marker(g) for g in step2] == ["trained:2", "trained:2"]

    store = RunStore(redis_client, keys)
    counters = store.counters()
    assert counters["learner.groups_trained"] == 4
    assert counters["learner.groups_skipped"] == 1
    assert counters["learner.groups_dropped"] == 1
    assert counters["learner.groups_duplicate"] == 1
    assert counters["learner.steps"] == 2
    # FlowControl: trained + skipped + dropped (a duplicate was consumed by its first copy).
    assert counters["learner.groups_consumed"] == 6
    fields = store.fields()
    assert (fields["step"], fields["policy_version"], fields["status"]) == ("2", "2", "finished")
    assert (fields["batch_groups"], fields["max_staleness"]) == ("2", "0")
    assert queue.backlog().pending == 0 and queue.backlog().lag == 0  # everything acked

    records = [
        json.loads(x) for x in (tmp_path / run_name / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert (train[1]["skipped"], train[1]["dropped"], train[1]["duplicates"]) == (1, 1, 1)
    assert train[1]["informative_frac"] == 2 / 3
    assert train[1]["staleness"] == {"0": 2}
    assert train[0]["accuracy"] == 0.25  # one correct completion of four in each group
    for key in ("loss", "score_gap", "mean_p_pos", "margin", "entropy", "grad_norm", "lr"):
        assert key in train[1], key
    assert [p["step"] for p in store.series("train")] == [1, 2]
    assert (tmp_path / run_name / "curves.png").stat().st_size > 1000
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["set"], r["n"]) for r in evals] == [(0, "arith", 6), (2, "arith", 6)]
    assert all(0 <= r["greedy"] <= 1 and 0 <= r["avg@2"] <= 1 for r in evals)
    assert [p["step"] for p in store.series("eval")] == [0, 2]

    ckpts = CheckpointManager(tmp_path / run_name / "checkpoints", keep=3).list()
    assert [p.name for p in ckpts] == ["ckpt-000000-step-00000001", "ckpt-000001-step-00000002"]


def test_skipped_groups_count_as_consumed_before_the_batch_is_complete(
    redis_url, redis_client, keys, groups_factory, learner_settings
):
    # With max_staleness = 0 generators may only have B groups in flight; if the learner
    # reported skipped groups only once B informative ones were in hand, the generators would
    # wait for the learner and the learner for them (conspo.flow).
    queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    first = groups_factory(1, prefix="a")
    uninformative = groups_factory(2, prefix="s", pattern=lambda i: [True] * 4)
    queue.publish_many([(g, g.group_id) for g in [*first, *uninformative]])
    settings = _settings(
        learner_settings,
        batch_groups=2,
        max_staleness=0,
        total_steps=1,
        wait_timeout_s=0,
        plot_every=0,
    )
    stop = threading.Event()
    learner = build_learner(
        settings, DistContext(), client=connect(redis_url), stop_requested=stop.is_set
    )
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(learner.run()), daemon=True)
    thread.start()
    try:
        consumed = lambda: int(redis_client.hget(keys.counters, CONSUMED) or 0)  # noqa: E731
        assert wait_for(lambda: consumed() == 2, 60)
        assert RunStore(redis_client, keys).fields()["step"] == "0"  # still assembling
        queue.publish_many([(g, g.group_id) for g in groups_factory(1, prefix="b")])
        thread.join(60)
        assert result == ["finished"]
        assert consumed() == 4
    finally:
        stop.set()
        thread.join(30)
        learner.close()
