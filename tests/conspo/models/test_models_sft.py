"""Warm start, evaluation, the committed checkpoint and `ensure_checkpoint`."""

from __future__ import annotations

import json

import pytest
import torch

from conspo.models import default_checkpoint, ensure_checkpoint
from conspo.models.sft import answer_token_ids, evaluate, main, train_sft, warm_start
from conspo.models.tiny import TinyModelConfig, build_tiny_model, load_policy
from conspo.tasks.arith import make_split, score
from conspo.tasks.registry import get_task

SMALL = TinyModelConfig(hidden_size=32, num_hidden_layers=1, intermediate_size=64)


@pytest.fixture(scope="module")
def committed():
    return load_policy(default_checkpoint())


@pytest.fixture(scope="module")
def recipe():
    return json.loads((default_checkpoint() / "recipe.json").read_text())


def _greedy_by_hand(model, tok, prompt: str, max_new_tokens: int = 8) -> str:
    """Independent greedy decoding: full forward each step, no cache, no batching."""
    ids = tok(prompt).input_ids
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                break
    return tok.decode(out, skip_special_tokens=True)


def test_committed_checkpoint_files_and_recipe(recipe):
    path = default_checkpoint()
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= names
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 5 * 2**20
    for key in (
        "seed",
        "steps",
        "batch_size",
        "lr",
        "versions",
        "greedy_pass_at_1",
        "wall_seconds",
        "split_seed",
        "n_test",
    ):
        assert key in recipe
    assert 0.2 <= recipe["greedy_pass_at_1"] <= 0.6
    assert {"torch", "transformers", "tokenizers"} <= set(recipe["versions"])


def test_committed_checkpoint_heldout_accuracy_in_band(committed, recipe):
    model, tok = committed
    test = make_split(None, recipe["n_test"], recipe["split_seed"]).test[:300]
    acc = evaluate(model, tok, test, greedy=True)
    assert 0.2 <= acc <= 0.6


def test_committed_chain_checkpoint_leaves_rl_headroom_and_mixed_groups():
    task = get_task("chain")
    recipe = json.loads((task.checkpoint / "recipe.json").read_text())
    assert recipe["task_name"] == "chain"
    assert 0.15 <= recipe["greedy_pass_at_1"] <= 0.5
    assert recipe["probe"]["group_size"] == 8
    assert recipe["probe"]["mixed_fraction"] >= 0.5
    assert recipe["probe"]["wrong_diverges_before_answer"] >= 0.9
    model, tok = load_policy(task.checkpoint)
    test = task.test_problems(200)
    acc = evaluate(model, tok, test, greedy=True, grade=task.grade, max_new_tokens=task.max_tokens)
    assert 0.15 <= acc <= 0.5


def test_evaluate_matches_independent_greedy_decoding(committed, recipe):
    model, tok = committed
    problems = make_split(None, recipe["n_test"], recipe["split_seed"]).test[:12]
    expected = sum(score(_greedy_by_hand(model, tok, p.prompt), p.answer) for p in problems)
    assert evaluate(model, tok, problems, greedy=True) == pytest.approx(expected / 12)


def test_evaluate_avg_at_n_is_a_fraction_of_samples(committed, recipe):
    model, tok = committed
    problems = make_split(None, recipe["n_test"], recipe["split_seed"]).test[:16]
    acc = evaluate(model, tok, problems, greedy=False, n=4, temperature=1.0, seed=3)
    assert acc * 64 == pytest.approx(round(acc * 64))
    assert 0.0 < acc < 1.0


def test_answer_targets_end_with_eos():
    _, tok = build_tiny_model(SMALL)
    problems = make_split(None, 10, 0).test[:3]
    for p, ids in zip(problems, answer_token_ids(tok, problems), strict=True):
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == p.answer


def test_train_sft_reduces_loss():
    model, tok = build_tiny_model(SMALL, seed=0)
    problems = make_split(2000, 10, 0).train
    losses: list[float] = []
    steps_run, _ = train_sft(
        model,
        tok,
        problems,
        steps=30,
        batch_size=32,
        lr=3e-3,
        seed=0,
        warmup_steps=5,
        callback=lambda step, loss: losses.append(loss),
    )
    assert steps_run == len(losses) == 30
    assert losses[0] > 3.0  # about log(101) at initialisation
    assert sum(losses[-5:]) / 5 < 0.75 * losses[0]
    assert not model.training


def test_train_sft_stops_when_callback_says_so():
    model, tok = build_tiny_model(SMALL, seed=0)
    problems = make_split(200, 10, 0).train
    steps_run, _ = train_sft(
        model,
        tok,
        problems,
        steps=50,
        batch_size=4,
        lr=1e-3,
        seed=0,
        callback=lambda step, loss: step >= 3,
    )
    assert steps_run == 3


def test_warm_start_stops_at_target_accuracy(tmp_path):
    report = warm_start(
        tmp_path / "ck",
        seed=0,
        steps=50,
        batch_size=4,
        model_config=SMALL,
        target_accuracy=0.0,
        min_steps=4,
        eval_every=2,
        n_val=10,
        n_eval=10,
    )
    assert report.steps_run == 4
    assert report.stopped_at_target
    assert report.val_greedy_pass_at_1 is not None
    assert report.n_val == 10


def test_warm_start_writes_loadable_checkpoint_and_recipe(tmp_path):
    out = tmp_path / "ck"
    report = warm_start(out, seed=1, steps=3, batch_size=8, lr=1e-3, model_config=SMALL, n_eval=20)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["seed"] == 1
    assert recipe["steps"] == 3
    assert recipe["steps_run"] == 3
    assert recipe["stopped_at_target"] is False  # 3 steps never reach the target
    assert recipe["model"]["hidden_size"] == SMALL.hidden_size
    assert recipe["greedy_pass_at_1"] == report.greedy_pass_at_1
    assert recipe["n_eval"] == 20
    model, tok = load_policy(out)
    assert sum(p.numel() for p in model.parameters()) == report.n_params
    assert tok("1+1=").input_ids[0] == tok.bos_token_id


def test_ensure_checkpoint(tmp_path, monkeypatch):
    assert ensure_checkpoint(None, fresh=False) == default_checkpoint()
    existing = tmp_path / "existing"
    ensure_checkpoint(existing, fresh=False, steps=1, batch_size=4, model_config=SMALL, n_eval=4)
    assert (existing / "recipe.json").is_file()  # a path without a checkpoint is trained into
    assert ensure_checkpoint(existing, fresh=False) == existing
    monkeypatch.setenv("CONSPO_CACHE_DIR", str(tmp_path / "cache"))
    fresh = ensure_checkpoint(
        None, fresh=True, seed=2, steps=1, batch_size=4, model_config=SMALL, n_eval=4
    )
    assert fresh == tmp_path / "cache" / "tiny-arith-seed2"
    assert json.loads((fresh / "recipe.json").read_text())["seed"] == 2
    assert ensure_checkpoint(None, task="chain") == get_task("chain").checkpoint


def test_warm_start_of_another_task_records_it(tmp_path):
    # The chain task's SFT target is the whole scratchpad; its recipe says which task it is
    # and holds the group probe the task asks for.
    report = warm_start(
        tmp_path / "chain",
        task="chain",
        seed=0,
        steps=2,
        batch_size=4,
        model_config=SMALL,
        n_train=200,
        n_val=10,
        target_accuracy=None,
        n_eval=4,
        probe_prompts=3,
    )
    recipe = json.loads((tmp_path / "chain" / "recipe.json").read_text())
    assert recipe["task_name"] == report.task_name == "chain"
    assert recipe["task"]["max_operands"] == 5
    assert recipe["n_train"] == 200  # no validation slice without a target accuracy
    assert recipe["probe"]["prompts"] == 3
    assert 0.0 <= recipe["probe"]["mixed_fraction"] <= 1.0
    with pytest.raises(ValueError):
        warm_start(tmp_path / "bad", task="chain", not_a_setting=1)


def test_cli_entry_point(tmp_path, capsys):
    main(
        [
            "--out",
            str(tmp_path / "cli"),
            "--seed",
            "5",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--n-eval",
            "8",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 5
    assert (tmp_path / "cli" / "recipe.json").is_file()
