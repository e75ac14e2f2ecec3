"""`conspo train` end to end: a user's own model and data in one command.

The acceptance test of issue 15: a model folder made the way docs/byo-model.md makes one (a
byte-level BPE trained locally, a tiny random Qwen2, save_pretrained; no bundled asset), a slice
of GSM8K, the math verifier, a TOML file with the run's settings. An untrained model's rewards
are all 0, so no step can happen: the run must end by itself, say why (the learner's `waiting`
in /v1/status and the CLI's progress display), and account for every prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conspo.models import default_checkpoint


def conspo(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conspo.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_train_a_user_made_model_on_gsm8k(tmp_path, redis_url, shared_data, user_model):
    rows = (shared_data / "gsm8k.jsonl").read_text().splitlines()[:12]
    data = tmp_path / "data" / "gsm8k-slice.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(rows) + "\n")
    run = f"t-train-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "run.toml"
    config.write_text(
        f"""
[train]
model = "{user_model}"
data = "{data}"
prompt_field = "question"
answer_after = "#### "
verifier = "math"
objective = "conspo"
steps = 3
batch_groups = 4
group_size = 4
max_tokens = 24
epochs = 1
eval = "gsm8k"
eval_samples = 4
eval_max_tokens = 8
idle_grace_s = 60
out = "{tmp_path / "out"}"

[learner]
block_ms = 200
"""
    )
    env = {**os.environ, "CONSPO_REDIS_URL": redis_url}
    proc = conspo(["train", "--config", str(config), "--run", run], env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-4000:]  # ended before `steps`, and said so
    assert "the run ended at step 0 of 3 (data_exhausted)" in proc.stdout, out[-4000:]

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    acc = summary["accounting"]
    assert (acc["lost"], acc["duplicated"]) == (0, 0), acc
    assert acc["submitted"] == acc["generated"] == acc["labelled"] == 12, acc
    assert (acc["trained"], acc["skipped"], acc["dead"]) == (0, 12, 0), acc
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    assert summary["accuracy_before"] == 0.0  # the evaluation at step 0 ran on GSM8K
    assert summary["prompt_format"]["chat"] is True  # the user's tokenizer has a chat template
    for name in ("checkpoints", "metrics", "logs", "summary"):
        assert name in summary["where"] and f"{name}: " in proc.stdout
    assert Path(summary["where"]["checkpoints"]).is_dir()

    # Why it waited: published by the learner in /v1/status (`waiting`, issue 15 item 4) and
    # shown by the progress display whenever it is set.
    waiting = summary["waiting"]
    assert waiting is not None, "no `waiting` in /v1/status"
    assert (waiting["service"], waiting["code"]) == ("learner", "all_equal_rewards"), waiting
    assert "equal rewards" in waiting["reason"], waiting
    assert f"waiting (learner, all_equal_rewards): {waiting['reason']}" in proc.stderr


@pytest.mark.slow
def test_train_the_bundled_model_with_tracking(tmp_path, redis_url):
    """The same command on the bundled arithmetic model: it trains, evaluates, checkpoints,
    writes curves, TensorBoard events and an offline W&B run, and says where each is."""
    pytest.importorskip("wandb", reason="the [tracking] extra is not installed")
    pytest.importorskip("tensorboard", reason="the [tracking] extra is not installed")
    from conspo.demo import training_rows

    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in training_rows()[:2000]))
    run = f"t-train-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out"
    argv = [
        "train",
        "--model",
        str(default_checkpoint()),
        "--data",
        str(data),
        "--verifier",
        "arith",
        "--max-tokens",
        "8",
        "--lr",
        "1e-4",
        "--steps",
        "4",
        "--batch-groups",
        "8",
        "--eval",
        "arith",
        "--eval-samples",
        "40",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "2",
        "--tracking",
        "tensorboard,wandb",
        "--run",
        run,
        "--out",
        str(out),
    ]
    env = {**os.environ, "CONSPO_REDIS_URL": redis_url, "WANDB_MODE": "offline"}
    proc = conspo(argv, env, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ended"] == "finished" and summary["final_train"]["step"] == 4
    acc = summary["accounting"]
    assert (acc["lost"], acc["duplicated"]) == (0, 0) and acc["trained"] >= 4 * 8
    assert [e["step"] for e in summary["eval"]] == [0, 2, 4]
    assert json.loads((out / "eval.json").read_text())["step"] == 4
    where = summary["where"]
    assert len(list(Path(where["checkpoints"]).glob("ckpt-*"))) >= 1
    assert Path(where["curves"]).stat().st_size > 1000
    assert list(Path(where["tensorboard"]).glob("events.out.tfevents.*"))
    assert list(Path(where["wandb"]).glob("offline-run-*/run-*.wandb"))
    assert "held-out greedy accuracy" in proc.stdout
    for name in ("checkpoints", "metrics", "final eval", "tensorboard", "wandb", "logs"):
        assert f"{name}: " in proc.stdout, name
