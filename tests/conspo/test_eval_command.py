"""`conspo eval`: the learner's numbers for the same weights and seed, a JSON result, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conspo.cli import build_parser
from conspo.eval_command import run
from conspo.evaluation import Evaluator, load_eval_set
from conspo.models import default_checkpoint
from conspo.models.tiny import context_length, load_policy
from conspo.settings import SettingsError


def args(*argv: str):
    return build_parser().parse_args(["eval", *argv])


def test_hf_backend_reproduces_the_learners_evaluation():
    result = run(args("--benchmark", "arith", "--n", "40", "--k", "2", "--seed", "7"))
    model, tokenizer = load_policy(default_checkpoint())
    learner = Evaluator(
        tokenizer,
        load_eval_set("arith", 40),
        k=2,
        temperature=0.6,
        top_p=0.95,
        max_tokens=None,
        seed=7,
        max_model_len=context_length(model, tokenizer),
    ).run(model, step=0)
    for key in ("greedy", "avg@2", "pass@2", "n"):
        assert result[key] == learner[key], key
    assert (result["temperature"], result["top_p"], result["max_tokens"]) == (0.6, 0.95, 8)


def test_the_command_prints_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "conspo.cli", "eval", "--n", "8", "--k", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert (printed["benchmark"], printed["n"], printed["backend"]) == ("arith", 8, "hf")
    assert 0.0 <= printed["greedy"] <= 1.0


def test_a_user_model_on_a_benchmark(user_model, shared_data):
    argv = ("--model", str(user_model), "--benchmark", "gsm8k", "--n", "3", "--k", "2")
    result = run(args(*argv, "--max-tokens", "4"))
    assert (result["n"], result["refused"], result["greedy"]) == (3, 0, 0.0)
    assert result["prompt_format"]["chat"] is True


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("--benchmark", "gsm9k"), "unknown benchmark 'gsm9k'"),
        (("--model", "/nonexistent"), "not a model folder"),
        (("--k", "0"), "--k must be at least 1"),
    ],
)
def test_bad_input_is_a_settings_error(argv, reason):
    with pytest.raises(SettingsError, match=reason):
        run(args(*argv))


def test_another_backend_is_an_engine_the_caller_passes_in():
    """``--backend vllm`` runs on the engine factory the cli names (``EVAL_ENGINES``); here the
    generator's hf engine stands in for vLLM, and gives the in-process numbers."""
    from conspo.cli import EVAL_ENGINES, _resolve
    from services.generator.backends.hf import HFBackend
    from services.generator.backends.vllm import VLLMBackend

    assert _resolve(EVAL_ENGINES["vllm"]) is VLLMBackend  # resolvable without vLLM installed
    built = []

    def hf_engine(model_path, *, seed: int) -> HFBackend:
        built.append((model_path, seed))
        return HFBackend.from_path(model_path, device="cpu", seed_mode="batch")

    argv = ("--benchmark", "arith", "--n", "12", "--k", "1", "--seed", "5")
    with pytest.raises(SettingsError, match="--backend vllm: no engine of that name"):
        run(args(*argv, "--backend", "vllm"))
    via_engine = run(args(*argv, "--backend", "vllm"), engines={"vllm": hf_engine})
    assert built == [(default_checkpoint(), 5)]
    assert via_engine["greedy"] == run(args(*argv))["greedy"]
    assert via_engine["backend"] == "vllm"
