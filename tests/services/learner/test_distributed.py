"""World size 2 on CPU: ``torchrun`` + FSDP2 over gloo, against world size 1 on the same data.

Opt-in (``CONSPO_TEST_TORCHRUN=1``): torchrun starts three Python processes that each import
torch and transformers, about a minute on a busy 2-core machine, which the default suite's time
budget cannot afford. The same code path runs with world size 1 in every other test.

The two-rank run is stopped half-way and resumed (FSDP2 checkpoint save and load). The runs
must agree to float tolerance, not bitwise: FSDP2 reduce-scatters gradients, so
the summation order differs from one process's accumulation.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conspo.keys import Keys
from conspo.lineage import LEARN
from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.redis_conn import connect, free_port
from conspo.settings import LearnerSettings
from conspo.state import RunStore
from conspo.testing import delete_run, spawn
from services.learner.checkpoint import CheckpointManager
from services.learner.distributed import DistContext
from services.learner.main import build_learner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("CONSPO_TEST_TORCHRUN") != "1", reason="set CONSPO_TEST_TORCHRUN=1"
    ),
]

B, STEPS = 3, 4


def _weights(root: Path) -> dict[str, torch.Tensor]:
    latest = CheckpointManager(root, 10).latest()
    assert latest is not None
    out: dict[str, torch.Tensor] = {}
    for f in latest.model_dir.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_two_ranks_with_fsdp2_train_like_one(
    redis_url, redis_client, run_name, keys, model_path, tmp_path, groups_factory, learner_env
):
    groups = groups_factory(B * STEPS, pattern=lambda i: [j <= i % 3 for j in range(4)], seed=5)
    settings = dict(
        batch_groups=B,
        total_steps=STEPS,
        checkpoint_every=3,  # the stop at step 2 writes its own checkpoint
        max_staleness=100,
        lr=1e-3,
        token_budget=60,  # several micro-batches per rank, uneven across ranks
    )
    ref_run = f"{run_name}-ws1"
    try:
        StreamQueue(redis_client, Keys(run=ref_run), "labeled", LabeledGroup).publish_many(
            [(g, g.group_id) for g in groups]
        )
        queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
        # Two ranks train half the steps, stop for lack of data (checkpoint, exit 0), then two
        # ranks resume from that checkpoint: FSDP2 save and load both exercised.
        queue.publish_many([(g, g.group_id) for g in groups[: B * STEPS // 2]])
        torchrun = Path(sys.executable).with_name("torchrun")

        def two_ranks(log: str):
            return spawn(
                [str(torchrun), "--nproc-per-node", "2", "--master-port", str(free_port()),
                 "-m", "conspo.cli", "learner"],
                env=learner_env(redis_url, run_name, model_path, tmp_path, wait_timeout_s=3,
                                **settings),
                log=tmp_path / log,
            )  # fmt: skip

        proc = two_ranks("ws2-a.log")
        s = LearnerSettings(
            redis_url=redis_url,
            run=ref_run,
            model_path=model_path,
            data_dir=tmp_path,
            progress_bar=False,
            plot_every=0,
            **settings,
        )
        learner = build_learner(s, DistContext(), client=connect(redis_url))
        try:
            assert learner.run() == "finished"
        finally:
            learner.close()
        assert proc.wait(timeout=300) == 0, (tmp_path / "ws2-a.log").read_text()[-3000:]
        assert RunStore(redis_client, keys).fields()["step"] == str(STEPS // 2)
        queue.publish_many([(g, g.group_id) for g in groups[B * STEPS // 2 :]])
        proc = two_ranks("ws2-b.log")
        assert proc.wait(timeout=300) == 0, (tmp_path / "ws2-b.log").read_text()[-3000:]
        assert "resuming from" in (tmp_path / "ws2-b.log").read_text()

        fields = RunStore(redis_client, keys).fields()
        assert (fields["status"], fields["step"]) == ("finished", str(STEPS))
        markers = [redis_client.get(keys.done(LEARN, g.group_id)).decode() for g in groups]
        assert markers == [f"trained:{i // B + 1}" for i in range(len(groups))]
        w2 = _weights(tmp_path / run_name / "checkpoints")
        w1 = _weights(tmp_path / ref_run / "checkpoints")
        assert w1.keys() == w2.keys()
        for name in w1:
            torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-4, msg=name)
        assert any(not torch.equal(w1[n], load_file_base(model_path)[n]) for n in w1)
    finally:
        delete_run(redis_client, ref_run)


def load_file_base(model_path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in Path(model_path).glob("*.safetensors"):
        out.update(load_file(f))
    return out
