"""Weight push with real processes: a learner and two hf-style receivers over gloo.

After each push both receivers hold exactly the learner's parameters (bitwise, compared with the
learner's checkpoint of that step) and serve the new version; a receiver killed mid-run makes at
most one push fail, within the timeout, and later pushes reach the survivor.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.redis_conn import connect
from conspo.settings import LearnerSettings
from conspo.testing import spawn, wait_for
from conspo.weight_sync import read_announcement, read_members, served_versions
from services.learner.checkpoint import CheckpointManager
from services.learner.distributed import DistContext
from services.learner.main import build_learner

WORKER = Path(__file__).with_name("receiver_worker.py")
TIMEOUT_S = 6.0


def _checkpoint_weights(root: Path, step: int) -> dict[str, torch.Tensor]:
    path = next(p for p in CheckpointManager(root, 100).list() if p.name.endswith(f"{step:08d}"))
    out: dict[str, torch.Tensor] = {}
    for f in (path / "model").glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _assert_same(received: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(received)
    assert got.keys() <= expected.keys() and got
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
def test_pushes_reach_receivers_bitwise_and_a_dead_one_does_not_hang_the_learner(
    redis_url, redis_client, run_name, keys, model_path, tmp_path, groups_factory
):
    out = tmp_path / "received"
    out.mkdir()
    procs = {
        name: spawn(
            [str(WORKER), redis_url, run_name, name, str(model_path), str(out), str(TIMEOUT_S)],
            log=tmp_path / f"{name}.log",
        )
        for name in ("gen-a", "gen-b")
    }
    stop = threading.Event()
    learner = None
    try:
        assert wait_for(lambda: len(read_members(redis_client, keys)) == 2, 150, 0.1), [
            (tmp_path / f"{n}.log").read_text()[-2000:] for n in procs
        ]
        settings = LearnerSettings(
            redis_url=redis_url,
            run=run_name,
            model_path=model_path,
            data_dir=tmp_path,
            batch_groups=2,
            total_steps=5,
            max_staleness=10,
            push_every=1,
            checkpoint_every=1,
            keep_checkpoints=10,
            lr=1e-3,
            progress_bar=False,
            plot_every=0,
            block_ms=100,
            weight_sync_backend="gloo",
            weight_sync_timeout_s=TIMEOUT_S,
            weight_sync_member_ttl_s=60.0,  # the killed receiver still looks alive at the next push
        )
        learner = build_learner(
            settings, DistContext(), client=connect(redis_url), stop_requested=stop.is_set
        )
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.append(learner.run()), daemon=True)
        thread.start()

        queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
        groups = groups_factory(
            10, group_size=4, pattern=lambda i: [True, False, i % 2 == 0, False]
        )
        queue.publish_many([(g, g.group_id) for g in groups[:4]])  # steps 1 and 2
        ckpts = tmp_path / run_name / "checkpoints"
        assert wait_for(lambda: served_versions(redis_client, keys) == {"gen-a": 2, "gen-b": 2}, 60)
        for version in (1, 2):
            expected = _checkpoint_weights(ckpts, version)
            for name in procs:
                _assert_same(out / f"{name}-v{version}.safetensors", expected)

        os.kill(procs["gen-b"].pid, signal.SIGKILL)
        procs["gen-b"].wait(timeout=30)
        queue.publish_many([(g, g.group_id) for g in groups[4:]])  # steps 3 to 5
        thread.join(timeout=4 * TIMEOUT_S + 60)
        assert not thread.is_alive(), "the learner hung on a dead receiver"
        assert result == ["finished"]

        records = [json.loads(x) for x in (tmp_path / run_name / "metrics.jsonl").open()]
        pushes = [(r["step"], r["push_ok"], r["push_s"]) for r in records if r["kind"] == "train"]
        assert all(seconds < TIMEOUT_S + 10 for _, _, seconds in pushes), pushes
        assert [ok for _, ok, _ in pushes[:2]] == [True, True]
        assert pushes[-1][1] is True  # the group was rebuilt without the dead receiver
        assert wait_for(lambda: served_versions(redis_client, keys).get("gen-a") == 5, 30)
        _assert_same(out / "gen-a-v5.safetensors", _checkpoint_weights(ckpts, 5))
        assert not (out / "gen-b-v5.safetensors").exists()
        announcement = read_announcement(redis_client, keys)
        assert announcement is not None and announcement.version == 5
        assert announcement.checkpoint_path == str(CheckpointManager(ckpts, 1).latest().model_dir)
        failures = sum(1 for _, ok, _ in pushes if not ok)
        assert int(redis_client.hget(keys.counters, "learner.push_failures") or 0) == failures
    finally:
        stop.set()
        if learner is not None:
            learner.close()
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        time.sleep(0)


@pytest.mark.slow
def test_an_idle_learner_pushes_its_weights_to_a_generator_that_joins(
    redis_url, redis_client, run_name, keys, model_path, tmp_path
):
    """A restarted generator may need the current weights before it can generate the data the
    learner waits for: the learner pushes to it without waiting for a step."""
    out = tmp_path / "received"
    out.mkdir()
    stop = threading.Event()
    settings = LearnerSettings(
        redis_url=redis_url, run=run_name, model_path=model_path, data_dir=tmp_path,
        batch_groups=2, total_steps=5, progress_bar=False, plot_every=0, block_ms=100,
        weight_sync_backend="gloo", weight_sync_timeout_s=TIMEOUT_S, eval_every=0,
    )  # fmt: skip
    learner = build_learner(
        settings, DistContext(), client=connect(redis_url), stop_requested=stop.is_set
    )
    thread = threading.Thread(target=learner.run, daemon=True)
    proc = None
    try:
        thread.start()  # step 0, no data: it waits (and has pushed nothing yet)
        proc = spawn(
            [
                str(WORKER),
                redis_url,
                run_name,
                "gen-new",
                str(model_path),
                str(out),
                str(TIMEOUT_S),
            ],
            log=tmp_path / "gen-new.log",
        )
        assert wait_for(lambda: "gen-new" in read_members(redis_client, keys), 150, 0.1), (
            tmp_path / "gen-new.log"
        ).read_text()[-2000:]
        joined = time.monotonic()
        assert wait_for(lambda: served_versions(redis_client, keys).get("gen-new") == 0, 30)
        assert time.monotonic() - joined < 15.0  # one idle check (1 s) and a push, with slack
        announcement = read_announcement(redis_client, keys)
        assert announcement is not None and announcement.rendezvous is not None
        assert announcement.rendezvous.members == ["gen-new"]
        assert redis_client.hget(keys.state, "step") == b"0"  # no step was needed
        expected = {n: p.detach() for n, p in learner.model.named_parameters()}
        _assert_same(out / "gen-new-v0.safetensors", expected)
    finally:
        stop.set()
        thread.join(60)
        learner.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
