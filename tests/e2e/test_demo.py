"""`conspo demo` end to end, as the README runs it, with a small step budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_trains_and_accounts_for_every_prompt(tmp_path, redis_url):
    out = tmp_path / "demo"
    env = {**os.environ, "CONSPO_REDIS_URL": redis_url}
    argv = ["demo", "--steps", "6", "--seed", "3", "--quiet", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "conspo.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    acc = summary["accounting"]
    assert summary["final_train"]["step"] == 6
    assert acc["trained"] >= 6 * 32  # six steps of B=32 informative groups
    assert acc["lost"] == 0
    assert acc["duplicated"] == 0
    assert acc["submitted"] >= acc["generated"] >= acc["labelled"] >= acc["trained"]
    assert summary["accuracy_before"] is not None
    assert summary["accuracy_after"] >= summary["accuracy_before"] - 0.10  # no collapse
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    assert "held-out greedy accuracy" in proc.stdout


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_trains_through_the_vllm_generator(tmp_path, redis_url):
    """The same run with the generator on a real vLLM engine: every push reaches the engine's
    worker over gloo (the served version follows the learner), and the books balance."""
    pytest.importorskip("vllm", reason="vLLM is not installed here: run `make test-vllm`")
    out = tmp_path / "demo"
    env = {**os.environ, "CONSPO_REDIS_URL": redis_url}
    argv = ["demo", "--backend", "vllm", "--steps", "4", "--seed", "4", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "conspo.cli", *argv, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "vllm"
    acc = summary["accounting"]
    assert summary["final_train"]["step"] == 4
    assert acc["lost"] == 0 and acc["duplicated"] == 0
    assert acc["trained"] >= 4 * 32
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    # Step 4 trains at version 3 on groups at most 1 version stale: they were sampled by pushed
    # weights (v2 or v3), so the engine applied the learner's pushes.
    assert summary["final_train"]["version"] == 4
    assert summary["final_train"]["staleness_max"] <= 1
