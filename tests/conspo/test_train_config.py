"""Where each `conspo train` knob comes from, what reaches the services, how data is planned."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from conspo.cli import build_parser
from conspo.models import default_checkpoint
from conspo.rows import PromptFormat
from conspo.settings import SettingsError
from conspo.train import stack_config
from conspo.train_config import (
    TrainConfig,
    auto_epochs,
    has_chat_template,
    plan_data,
    prompt_format,
    resolve,
    service_overrides,
)

TOML = """
seed = 5                 # top-level: every service
[train]
data = "gsm8k"
steps = 7
[learner]
lr = 3e-5
objective = "grpo"
kl_beta = 0.02
[generator]
top_p = 0.9
temperature = 0.7
[verifier]
processes = 3
[api]
dataset_roots = ["/srv/data"]
"""


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CONSPO_LR", "CONSPO_OBJECTIVE", "CONSPO_TOP_P", "CONSPO_SEED", "CONSPO_KL_BETA"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    return path


def test_flag_beats_train_table_beats_env_beats_service_table(config, monkeypatch):
    monkeypatch.setenv("CONSPO_OBJECTIVE", "dr_grpo")
    cfg, _ = resolve(parse("--steps", "9"), str(config))
    assert cfg.steps == 9  # flag over [train]
    assert cfg.data == "gsm8k"  # [train]
    assert cfg.objective == "dr_grpo"  # env over [learner]
    assert cfg.lr == 3e-5  # [learner] lr is --lr
    assert cfg.temperature == 0.7  # [generator] temperature is --temperature
    assert cfg.seed == 5  # a top-level key
    assert cfg.batch_groups == 32  # the default


def test_a_task_default_yields_to_the_file_and_flags(config):
    cfg, _ = resolve(parse(), str(config), task={"lr": 1e-4, "max_tokens": 8, "steps": 200})
    assert (cfg.lr, cfg.max_tokens, cfg.steps) == (3e-5, 8, 7)


def test_unknown_train_keys_are_refused_with_their_name(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nstpes = 3\n")
    with pytest.raises(SettingsError, match="stpes"):
        resolve(parse(), str(path))


def test_settings_that_are_not_knobs_reach_their_service_as_env(config, monkeypatch):
    monkeypatch.setenv("CONSPO_TOP_P", "0.8")  # the environment beats the file
    _, raw = resolve(parse(), str(config))
    env = service_overrides(raw)
    assert env["learner"]["CONSPO_KL_BETA"] == "0.02"
    assert env["generator"]["CONSPO_TOP_P"] == "0.8"
    assert env["verifier"]["CONSPO_PROCESSES"] == "3"
    assert json.loads(env["api"]["CONSPO_DATASET_ROOTS"]) == ["/srv/data"]
    # knobs travel as StackConfig fields, and the stack keeps its own run/redis/port/token
    for service in env.values():
        for name in ("CONSPO_LR", "CONSPO_SEED", "CONSPO_TEMPERATURE", "CONSPO_RUN", "CONSPO_PORT"):
            assert name not in service


def test_the_stack_gets_the_knobs_the_dataset_root_and_the_eval_format(config, shared_data):
    cfg, raw = resolve(parse("--eval", "math500", "--tracking", "tensorboard"), str(config))
    fmt = prompt_format(cfg.verifier, True)
    plan = plan_data(cfg, fmt)
    stack = stack_config(cfg, raw, "redis://x:1/0", Path(default_checkpoint()), fmt, plan)
    assert (stack.objective, stack.lr, stack.steps, stack.seed) == ("grpo", 3e-5, 7, 5)
    assert stack.eval_every == 1  # steps // 4, at least 1
    roots = json.loads(stack.env["api"]["CONSPO_DATASET_ROOTS"])
    assert roots == ["/srv/data", str(shared_data)]
    learner = stack.env["learner"]
    assert learner["CONSPO_EVAL_SET"] == "math500"
    assert PromptFormat.model_validate_json(learner["CONSPO_EVAL_PROMPT_FORMAT"]) == fmt
    assert json.loads(learner["CONSPO_TRACKING"]) == ["tensorboard"]


def test_a_benchmark_name_becomes_a_path_under_the_shared_folder(shared_data):
    cfg = TrainConfig(data="gsm8k", steps=10, batch_groups=32)
    fmt = prompt_format("math", chat_template=False)
    plan = plan_data(cfg, fmt)
    assert plan.root == shared_data
    assert plan.spec["path"] == "gsm8k.jsonl"
    assert (plan.spec["prompt_field"], plan.spec["answer_after"]) == ("question", "#### ")
    assert plan.spec["template"].endswith("\\boxed{}.") and "chat" not in plan.spec
    assert plan.spec["epochs"] == 1  # 2 * 10 * 32 groups need < 1319 rows


def test_a_file_is_sent_as_a_path_relative_to_its_folder(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"q": "1+1?", "a": "2"}\n\n{"q": "2+2?", "a": "4"}\n')
    cfg = TrainConfig(data=str(data), prompt_field="q", answer_field="a", steps=3, batch_groups=2)
    plan = plan_data(cfg, PromptFormat(chat=True))
    assert (plan.root, plan.spec["path"], plan.rows) == (tmp_path, "mine.jsonl", 2)
    assert (plan.spec["prompt_field"], plan.spec["answer_field"], plan.spec["chat"]) == (
        "q",
        "a",
        True,
    )
    assert plan.spec["epochs"] == 6 == auto_epochs(cfg, 2)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(SettingsError, match="no such file, and not a benchmark"):
        plan_data(TrainConfig(data=str(tmp_path / "nope.jsonl")), PromptFormat())
    with pytest.raises(SettingsError, match="--data is required"):
        plan_data(TrainConfig(), PromptFormat())


def test_prompt_format_follows_the_model_and_the_flags(user_model, tmp_path):
    assert has_chat_template(user_model)
    (tmp_path / "config.json").write_text("{}")
    assert not has_chat_template(tmp_path)
    math_chat = prompt_format("math", True)
    assert math_chat.chat and math_chat.template.startswith("{prompt}\n")
    assert prompt_format("math", True, chat="off").chat is False
    assert prompt_format("math", False, template="").template is None  # the bare question
    assert prompt_format("arith", False) == PromptFormat()
    assert prompt_format("math", False, system_prompt="S").system_prompt == "S"
