"""Kill -9 mid-run, restart, finish: every group trained exactly once, same weights as a run
that was never interrupted (same seed, same data, same thread count).

The victim is a real ``conspo learner`` process (killed with SIGKILL, restarted as a process);
the uninterrupted reference runs in the test process while the victim imports torch, which
saves a process start (the learner's imports take 10-25 s on a busy 2-core machine).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conspo.keys import Keys
from conspo.lineage import LEARN
from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.redis_conn import connect
from conspo.settings import LearnerSettings
from conspo.state import RunStore
from conspo.testing import delete_run, wait_for
from services.learner.checkpoint import CheckpointManager
from services.learner.distributed import DistContext
from services.learner.main import build_learner

B, STEPS, EVERY = 4, 8, 2


def _fields(client, run: str) -> dict[str, str]:
    return RunStore(client, Keys(run=run)).fields()


def _final_weights(data_dir: Path, run: str) -> tuple[dict, dict]:
    latest = CheckpointManager(data_dir / run / "checkpoints", keep=1).latest()
    assert latest is not None
    weights = {}
    for f in latest.model_dir.glob("*.safetensors"):
        weights.update(load_file(f))
    return weights, latest.load_blob("optimizer")


@pytest.mark.slow
def test_kill_and_resume_trains_every_group_once_and_matches_an_uninterrupted_run(
    redis_url,
    redis_client,
    run_name,
    keys,
    model_path,
    tmp_path,
    groups_factory,
    spawn_learner,
    learner_env,
):
    groups = groups_factory(
        B * STEPS, group_size=4, pattern=lambda i: [j <= i % 3 for j in range(4)], seed=7
    )
    ref_run = f"{run_name}-ref"
    ref_keys = Keys(run=ref_run)
    settings = dict(
        batch_groups=B,
        total_steps=STEPS,
        checkpoint_every=EVERY,
        keep_checkpoints=50,
        max_staleness=100,
        lr=3e-3,
        seed=1,
    )
    try:
        ref_q = StreamQueue(redis_client, ref_keys, "labeled", LabeledGroup)
        ref_q.publish_many([(g, g.group_id) for g in groups])
        queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
        # The victim gets all but the last step's data up front: it cannot finish before the
        # kill, whatever the machine's speed.
        queue.publish_many([(g, g.group_id) for g in groups[: B * (STEPS - 1)]])

        victim = spawn_learner(
            learner_env(redis_url, run_name, model_path, tmp_path, **settings),
            tmp_path / "victim-1.log",
        )
        # The uninterrupted reference runs in this process while the victim starts up.
        _run_in_process(redis_url, ref_run, model_path, tmp_path, settings)
        assert wait_for(
            lambda: int(_fields(redis_client, run_name).get("step", 0)) > EVERY, 150, 0.02
        ), (tmp_path / "victim-1.log").read_text()[-3000:]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        killed_at = int(_fields(redis_client, run_name)["step"])
        assert EVERY < killed_at < STEPS
        assert _fields(redis_client, run_name)["status"] == "running"
        assert queue.backlog().pending > 0  # trained-but-uncheckpointed entries are still ours

        queue.publish_many([(g, g.group_id) for g in groups[B * (STEPS - 1) :]])
        restarted = spawn_learner(
            learner_env(redis_url, run_name, model_path, tmp_path, **settings),
            tmp_path / "victim-2.log",
        )
        assert restarted.wait(timeout=150) == 0, (tmp_path / "victim-2.log").read_text()[-3000:]

        restart_log = (tmp_path / "victim-2.log").read_text()
        assert "resuming from" in restart_log
        if killed_at % EVERY:
            assert "replaying" in restart_log  # steps after the last checkpoint were redone

        for run, q in ((run_name, queue), (ref_run, ref_q)):
            fields = _fields(redis_client, run)
            assert (fields["status"], fields["step"]) == ("finished", str(STEPS))
            backlog = q.backlog()
            assert backlog.pending == 0 and backlog.lag == 0

        # Exactly once: group i of the stream is trained in step i // B + 1 in both runs.
        expected = [f"trained:{i // B + 1}" for i in range(len(groups))]
        for k in (keys, ref_keys):
            markers = [redis_client.get(k.done(LEARN, g.group_id)) for g in groups]
            assert [m.decode() for m in markers] == expected
        # The checkpoints' records cover every entry exactly once, across the crash.
        ckpts = CheckpointManager(tmp_path / run_name / "checkpoints", 50).list()
        recorded = [r.entry_id for p in ckpts for r in _state(p).records]
        assert len(recorded) == len(set(recorded)) == len(groups)
        counters = RunStore(redis_client, keys).counters()
        assert counters["learner.groups_trained"] == len(groups)
        assert counters["learner.groups_consumed"] == len(groups)
        assert counters.get("learner.groups_skipped", 0) == 0

        (w_victim, o_victim), (w_ref, o_ref) = (
            _final_weights(tmp_path, run_name),
            _final_weights(tmp_path, ref_run),
        )
        assert w_victim.keys() == w_ref.keys()
        for name in w_ref:
            assert torch.equal(w_victim[name], w_ref[name]), name
        for pid, state in o_ref["state"].items():
            for key, value in state.items():
                assert torch.equal(o_victim["state"][pid][key], value), (pid, key)
    finally:
        delete_run(redis_client, ref_run)


def _run_in_process(redis_url, run, model_path, data_dir, settings) -> None:
    """The same learner, same settings, same single thread, without a process boundary."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    s = LearnerSettings(
        redis_url=redis_url,
        run=run,
        model_path=model_path,
        data_dir=data_dir,
        progress_bar=False,
        num_threads=1,
        deterministic=True,
        plot_every=0,
        block_ms=200,
        **settings,
    )
    client = connect(redis_url)
    learner = build_learner(s, DistContext(), client=client)
    try:
        assert learner.run() == "finished"
    finally:
        learner.close()
        client.close()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _state(path: Path):
    from services.learner.checkpoint import STATE_FILE, CheckpointState

    return CheckpointState.model_validate_json((path / STATE_FILE).read_text())


@pytest.mark.slow
def test_kill_and_resume_with_skips_released_early_takes_the_same_decisions(
    redis_url, redis_client, run_name, keys, model_path, tmp_path, groups_factory, spawn_learner,
    learner_env,
):  # fmt: skip
    """Skipped groups are released between checkpoints (the ledger); a SIGKILL once some are,
    then a restart: every group still lands in the step it belongs to, skips are counted once."""
    b, steps, every = 2, 6, 3
    # Informative groups every third entry, all-equal ones between them; the stream ends on an
    # informative group so that every entry is decided by the time the last step is trained.
    n = 3 * b * steps - 2
    groups = groups_factory(
        n,
        group_size=4,
        seed=11,
        pattern=lambda i: [j <= i % 2 for j in range(4)] if i % 3 == 0 else [True] * 4,
    )
    expected, informative = [], 0
    for i in range(n):
        if i % 3 == 0:
            informative += 1
            expected.append(f"trained:{(informative - 1) // b + 1}")
        else:
            expected.append("skipped:all_equal")
    assert informative == b * steps
    settings = dict(
        batch_groups=b,
        total_steps=steps,
        checkpoint_every=every,
        keep_checkpoints=50,
        max_staleness=100,
        lr=3e-3,
        seed=1,
        waiting_after_s=0.2,  # release (and explain) at almost every read
    )
    queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    last_step_starts = expected.index(f"trained:{steps}")
    queue.publish_many([(g, g.group_id) for g in groups[:last_step_starts]])
    ckpts = CheckpointManager(tmp_path / run_name / "checkpoints", 50)

    def released_past_a_checkpoint() -> bool:
        latest = ckpts.latest()
        ledger = ckpts.read_ledger(latest.state.seq) if latest else None
        return ledger is not None and ledger.consumed > 0

    victim = spawn_learner(
        learner_env(redis_url, run_name, model_path, tmp_path, **settings),
        tmp_path / "victim-1.log",
    )
    assert wait_for(released_past_a_checkpoint, 150, 0.02), (tmp_path / "victim-1.log").read_text()[
        -3000:
    ]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    killed_at = int(_fields(redis_client, run_name)["step"])
    assert every <= killed_at < steps
    released = ckpts.read_ledger(ckpts.latest().state.seq)
    assert released is not None
    # What the ledger released is marked and acked, except, when the kill fell between the
    # ledger and its ack, the release in flight: still pending, listed in the ledger.
    recorded = {r.group_id for r in ckpts.latest().state.records}
    marked = [g.group_id for g, m in zip(groups, expected, strict=True)
              if m.startswith("skipped") and redis_client.exists(keys.done(LEARN, g.group_id))
              and g.group_id not in recorded]  # fmt: skip
    in_flight = [r.group_id for r in released.records
                 if not redis_client.exists(keys.done(LEARN, r.group_id))]  # fmt: skip
    assert len(marked) + len(in_flight) == released.consumed > 0
    queue.publish_many([(g, g.group_id) for g in groups[last_step_starts:]])
    restarted = spawn_learner(
        learner_env(redis_url, run_name, model_path, tmp_path, **settings),
        tmp_path / "victim-2.log",
    )
    assert restarted.wait(timeout=150) == 0, (tmp_path / "victim-2.log").read_text()[-3000:]
    assert "release ledger:" in (tmp_path / "victim-2.log").read_text()

    fields = _fields(redis_client, run_name)
    assert (fields["status"], fields["step"]) == ("finished", str(steps))
    backlog = queue.backlog()
    assert backlog.pending == 0 and backlog.lag == 0
    markers = [redis_client.get(keys.done(LEARN, g.group_id)) for g in groups]
    assert [m.decode() if m else None for m in markers] == expected
    tally = redis_client.hvals(keys.tally(LEARN))
    assert len(tally) == n and {int(t) for t in tally} == {1}  # each decided once, for good
    counters = RunStore(redis_client, keys).counters()
    assert counters["learner.groups_trained"] == b * steps
    assert counters["learner.groups_skipped"] == n - b * steps
    assert counters["learner.groups_consumed"] == n
    final = ckpts.latest()
    assert final.state.counters["groups_skipped"] == n - b * steps
    assert final.state.consumed_total == n
