"""SIGTERM: the learner finishes the step in flight, checkpoints, acks, and ``main`` returns 0.

Runs ``services.learner.main.main`` in the test process (a real SIGTERM to this process, the
real signal handlers), which saves a process start; the kill-and-resume test covers the
subprocess path.
"""

from __future__ import annotations

import os
import signal
import threading

from conspo.lineage import LEARN
from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.state import RunStore
from conspo.testing import wait_for
from services.learner.checkpoint import CheckpointManager

B = 4


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(
    redis_url, redis_client, run_name, keys, model_path, tmp_path, groups_factory, monkeypatch,
    learner_env,
):  # fmt: skip
    groups = groups_factory(
        B * 12, group_size=4, pattern=lambda i: [True, i % 2 == 1, False, False]
    )
    queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    ids = queue.publish_many([(g, g.group_id) for g in groups])
    env = learner_env(
        redis_url,
        run_name,
        model_path,
        tmp_path,
        batch_groups=B,
        total_steps=100,
        checkpoint_every=1000,
        lr=1e-3,
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    store = RunStore(redis_client, keys)
    sent_at: list[int] = []

    def terminate_mid_run() -> None:
        if wait_for(lambda: int(store.fields().get("step", 0)) >= 1, 120, 0.01):
            sent_at.append(int(store.fields()["step"]))
            os.kill(os.getpid(), signal.SIGTERM)

    from services.learner.main import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    killer = threading.Thread(target=terminate_mid_run, daemon=True)
    killer.start()
    try:
        assert main(None) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    killer.join(5)
    assert sent_at, "the learner never completed a step"

    fields = store.fields()
    step = int(fields["step"])
    # The step in flight when the signal came was completed, nothing after it was started.
    assert sent_at[0] <= step <= sent_at[0] + 1
    assert step < 12
    assert fields["status"] == "idle"
    latest = CheckpointManager(tmp_path / run_name / "checkpoints", keep=3).latest()
    assert latest is not None and latest.state.step == step and latest.state.version == step
    beats = [b for b in store.heartbeats() if b.service == "learner"]
    assert [b.status for b in beats] == ["stopped"]

    trained = B * step
    markers = [redis_client.get(keys.done(LEARN, g.group_id)) for g in groups]
    assert [m.decode() for m in markers[:trained]] == [
        f"trained:{i // B + 1}" for i in range(trained)
    ]
    assert markers[trained:] == [None] * (len(groups) - trained)
    pending = {
        p["message_id"].decode()
        for p in redis_client.xpending_range(keys.labeled, "learners", "-", "+", 1000)
    }
    assert pending.isdisjoint(ids[:trained])  # every trained entry is acked
