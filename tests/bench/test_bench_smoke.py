"""Every benchmark's ``--smoke`` mode runs through ``bench/run_all.py`` and leaves a parseable
JSON with the keys its report needs. Nothing here asserts a speed: timings on a shared CI
machine mean nothing; the benchmarks' job is to measure, this test's to keep them runnable.

The light benchmarks run together in one ``run_all.py --smoke --only ...`` call (about a
minute); the pipeline ones (three or four full stacks each) are ``slow`` and run one per test.
The model benchmarks use ``$CONSPO_BENCH_MODEL`` if set, else the bundled checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_ALL = ROOT / "bench" / "run_all.py"

# What each report is built from (docs/benchmarks.md): the spec of the JSON, key by key.
EXPECTED = {
    "queue_throughput": {"machine", "groups_per_s", "ratio_vs_raw_xadd"},
    "objectives_overhead": {"machine", "seconds", "ratio"},
    "generator_throughput": {"machine", "results"},
    "weight_sync": {"machine", "results"},
    "verifier_throughput": {"machine", "cores", "replicas", "runs"},
    "objectives": {"machine", "objectives", "warm_start_accuracy", "target", "runs"},
    "async_vs_sync": {"machine", "modes", "runs"},
    "vs_trl": {"machine", "results", "accuracy_start", "mismatches", "goals"},
    "profile_step": {"machine", "runs", "categories"},
}


ALL_OBJECTIVES = {
    "conspo",
    "grpo",
    "dapo",
    "dr_grpo",
    "disco",
    "gspo",
    "conspo_linear",
    "conspo_ratio",
    "conspo_nomargin",
    "conspo_fixedmargin",
}


def _model() -> str | None:
    env = os.environ.get("CONSPO_BENCH_MODEL")
    if env:
        return env
    from conspo.models import default_checkpoint

    path = default_checkpoint()
    return str(path) if (path / "config.json").is_file() else None


def _run_all(names: list[str], results: Path, redis_url: str, timeout: float) -> str:
    cmd = [sys.executable, str(RUN_ALL), "--smoke", "--results", str(results), "--only", *names]
    model = _model()
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "CONSPO_REDIS_URL": redis_url}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    out = proc.stdout + proc.stderr
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((results / "logs").glob("*"))
    )
    assert proc.returncode == 0, out[-4000:] + logs
    return out


def _check(results: Path, names: list[str], out: str) -> dict[str, dict]:
    combined = json.loads((results / "run_all.json").read_text())
    rows = {b["name"]: b for b in combined["benchmarks"]}
    got = {}
    for name in names:
        data = json.loads((results / f"{name}.json").read_text())
        assert EXPECTED[name] <= set(data), f"{name}: missing {EXPECTED[name] - set(data)}"
        assert rows[name]["status"] == "ok"
        assert rows[name]["summary"] and not rows[name]["summary"].startswith("(no summary)")
        assert name in out  # the combined table lists it
        got[name] = data
    return got


def test_light_benchmarks_smoke(tmp_path, redis_url):
    names = ["queue_throughput", "objectives_overhead", "weight_sync"]
    if _model():
        names += ["generator_throughput", "objectives"]
    out = _run_all(names, tmp_path, redis_url, timeout=420)
    got = _check(tmp_path, names, out)
    if "objectives" in got:
        obj = got["objectives"]
        assert set(obj["objectives"]) == ALL_OBJECTIVES
        assert 0.0 <= obj["warm_start_accuracy"] <= 1.0
        # equal numbers of generated samples for every objective
        assert len({v["samples_per_run"] for v in obj["objectives"].values()}) == 1


def test_verifier_throughput_smoke(tmp_path, redis_url):
    from conspo.paths import shared_data_dir

    if not (shared_data_dir() / "math500.jsonl").is_file():
        pytest.skip(f"MATH-500 not at {shared_data_dir()} (set $CONSPO_SHARED_DATA)")
    out = _run_all(["verifier_throughput"], tmp_path, redis_url, timeout=300)
    ver = _check(tmp_path, ["verifier_throughput"], out)["verifier_throughput"]
    assert set(ver["replicas"]) == {"1", "2", "4"}
    for rep in ver["replicas"].values():
        assert rep["completions_per_s"] > 0
        assert rep["efficiency"] > 0


@pytest.mark.slow
def test_objectives_on_the_chain_task_smoke(tmp_path):
    # The comparison on the scratchpad task, every objective, one seed, a few steps: the
    # report's figures exist and every objective generated the same number of samples.
    out = tmp_path / "objectives-chain.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "objectives.py"), "--task", "chain", "--smoke",
         "--seeds", "0", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert EXPECTED["objectives"] <= set(data)
    assert data["config"]["task"] == "chain"
    assert set(data["objectives"]) == ALL_OBJECTIVES
    assert len({v["samples_per_run"] for v in data["objectives"].values()}) == 1
    for name, v in data["objectives"].items():
        assert 0.0 <= v["late_greedy"]["mean"] <= 1.0, name
        assert 0.0 <= v["late_avg_k"]["mean"] <= 1.0, name
        assert v["length_start"] > 20, name  # scratchpad completions, not bare answers
    assert {"grpo", "conspo"} == set(data["minus"])
    assert set(data["minus"]["grpo"]) == ALL_OBJECTIVES - {"grpo"}
    cosine = data["gradient_cosine"]["cosine"]
    assert cosine["conspo"]["conspo"] == pytest.approx(1.0)
    assert all(-1.0 <= c <= 1.0 + 1e-6 for c in cosine["conspo"].values())
    assert (tmp_path / "objectives-chain.png").is_file()
    assert "summary: chain:" in proc.stdout


@pytest.mark.slow
def test_async_vs_sync_smoke(tmp_path, redis_url):
    if not _model():
        pytest.skip("no model checkpoint (bundled asset missing, $CONSPO_BENCH_MODEL unset)")
    out = _run_all(["async_vs_sync"], tmp_path, redis_url, timeout=300)
    data = _check(tmp_path, ["async_vs_sync"], out)["async_vs_sync"]
    assert set(data["modes"]) == {"0", "1", "2"}
    for mode in data["modes"].values():
        assert {"step_s", "speedup", "ideal", "efficiency", "dropped_frac", "skipped_frac"} <= set(
            mode
        )
    assert all(r["accounting"]["lost"] == 0 for r in data["runs"])


@pytest.mark.slow
def test_vs_trl_smoke(tmp_path, redis_url):
    try:
        import trl  # noqa: F401
    except ImportError:
        # Without the optional extra the script must say so and fail, not crash obscurely.
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "vs_trl.py"), "--smoke"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2
        assert "needs TRL" in proc.stderr and "pip install" in proc.stderr
        return
    if not _model():
        pytest.skip("no model checkpoint (bundled asset missing, $CONSPO_BENCH_MODEL unset)")
    out = _run_all(["vs_trl"], tmp_path, redis_url, timeout=300)
    data = _check(tmp_path, ["vs_trl"], out)["vs_trl"]
    systems = [r["system"] for r in data["results"]]
    assert systems[0] == "trl grpo"
    assert any(s.startswith("pipeline conspo") for s in systems)
    for r in data["results"]:
        assert r["steps"] == data["config"]["steps"]
        assert 0.0 <= r["accuracy"] <= 1.0
    names = {g["name"] for g in data["goals"]}
    assert "vs TRL samples/s, max_staleness 1" in names  # what run_all judges against 1.0x
    schema = {"name", "value", "goal", "unit", "higher_is_better"}
    assert all(schema <= set(g) for g in data["goals"])


@pytest.mark.slow
def test_profile_step_smoke(tmp_path, redis_url):
    if not _model():
        pytest.skip("no model checkpoint (bundled asset missing, $CONSPO_BENCH_MODEL unset)")
    out = _run_all(["profile_step"], tmp_path, redis_url, timeout=300)
    data = _check(tmp_path, ["profile_step"], out)["profile_step"]
    (run,) = data["runs"]
    assert run["accounting"]["lost"] == 0
    assert {"learner-0", "generator-0", "verifier-0", "api-0"} <= set(run["cpu_s_per_step"])
    assert run["learner_s_per_step"]["fwd_bwd"] > 0


def test_gpu_scale_smoke_on_cpu(tmp_path):
    # The GPU variant (a Qwen2.5-0.5B body) runs on a lent GPU only; its smoke mode runs the same
    # code path (hf generation, Trainer.step per objective, weight hand-off) on a 2-layer model.
    out = tmp_path / "gpu_scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_scale.py"), "--smoke", "--device", "cpu",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["train_step_s"]) == {"conspo", "grpo", "gspo"}
    assert data["generation"]["tokens"] > 0
    assert data["weights"]["bytes"] == 2 * data["config"]["parameters"]  # bf16
    assert 1.0 <= data["ideal_async_speedup"] <= 2.0
    assert "summary:" in proc.stdout
