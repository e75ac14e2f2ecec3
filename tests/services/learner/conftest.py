"""Fixtures for the learner tests: the tiny model and synthetic labelled groups.

Groups are hand-made on the arithmetic task: the completions are answer strings (the right one
and wrong ones) followed by EOS, their behaviour log-probs come from teacher forcing with the
tiny model (what the generator would have recorded with the same weights), and the rewards are
what the ``arith`` rule gives, so positives and negatives are what the verifier would say.
"""

from __future__ import annotations

import functools
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conspo.models.logprobs import completion_logprobs
from conspo.models.tiny import load_policy
from conspo.protocol import (
    Completion,
    Label,
    LabeledGroup,
    Prompt,
    RolloutGroup,
    SamplingParams,
    Verdict,
)
from conspo.tasks.arith import make_split, score
from conspo.testing import spawn


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled warm-started tiny model (``conspo.models.default_checkpoint()``).

    If the bundled checkpoint is absent (a checkout without ``conspo/assets``), a freshly
    initialised tiny model of the same architecture stands in: none of these tests depends on
    the model's accuracy, only on its being a real ``from_pretrained`` causal LM.
    """
    from conspo.models import default_checkpoint

    path = Path(default_checkpoint())
    if (path / "config.json").is_file():
        return path
    from conspo.models.tiny import build_tiny_model, save_model

    model, tokenizer = build_tiny_model(seed=0)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny(model_path: Path):
    model, tokenizer = load_policy(model_path)
    return model, tokenizer


@functools.cache
def _problems():
    return make_split(0, 1000, 0).test


def make_groups(
    model,
    tokenizer,
    n: int,
    *,
    group_size: int = 4,
    seed: int = 0,
    version: int | Callable[[int], int] = 0,
    pattern: Callable[[int], list[bool]] | None = None,
    prefix: str = "g",
) -> list[LabeledGroup]:
    """``n`` labelled groups; ``pattern(i)`` gives which completions of group i are correct
    (default: the first one only, so every group is informative)."""
    rng = random.Random(seed)
    problems = _problems()
    out = []
    for i in range(n):
        p = problems[(seed * 131 + i) % len(problems)]
        correct = pattern(i) if pattern else [j == 0 for j in range(group_size)]
        texts = []
        for ok in correct:
            if ok:
                texts.append(p.answer)
            else:
                wrong = int(p.answer) + rng.choice([-11, -2, -1, 1, 3, 10, 20])
                texts.append(str(wrong))
        prompt_ids = list(tokenizer(p.prompt).input_ids)
        comp_ids = [
            [*tokenizer(t, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            for t in texts
        ]
        with torch.no_grad():
            logp, _, _ = completion_logprobs(model, [prompt_ids] * len(texts), comp_ids)
        completions = [
            Completion(
                token_ids=ids,
                logprobs=logp[j, : len(ids)].tolist(),
                text=t,
                finish_reason="stop",
            )
            for j, (ids, t) in enumerate(zip(comp_ids, texts, strict=True))
        ]
        labels = [
            Label(reward=1.0, verdict=Verdict.CORRECT)
            if score(t, p.answer)
            else Label(reward=0.0, verdict=Verdict.WRONG)
            for t in texts
        ]
        v = version(i) if callable(version) else version
        rollout = RolloutGroup(
            group_id=f"{prefix}-{seed}-{i}",
            prompt=Prompt(prompt_id=f"p-{seed}-{i}", text=p.prompt, answer=p.answer),
            prompt_token_ids=prompt_ids,
            completions=completions,
            policy_version=v,
            sampling=SamplingParams(n=len(texts), temperature=1.0, max_tokens=8),
        )
        out.append(LabeledGroup(rollout=rollout, labels=labels))
    return out


@pytest.fixture
def groups_factory(tiny):
    model, tokenizer = tiny

    def factory(n: int, **kwargs) -> list[LabeledGroup]:
        return make_groups(model, tokenizer, n, **kwargs)

    return factory


def _learner_env(redis_url: str, run: str, model_path: Path, data_dir: Path, **settings) -> dict:
    """Environment of a ``conspo learner`` subprocess (deterministic CPU settings)."""
    env = {
        "CONSPO_REDIS_URL": redis_url,
        "CONSPO_RUN": run,
        "CONSPO_MODEL_PATH": str(model_path),
        "CONSPO_DATA_DIR": str(data_dir),
        "CONSPO_PROGRESS_BAR": "false",
        "CONSPO_NUM_THREADS": "1",
        "CONSPO_DETERMINISTIC": "true",
        "CONSPO_PLOT_EVERY": "0",
        "CONSPO_BLOCK_MS": "200",
        "OMP_NUM_THREADS": "1",
    }
    env.update({f"CONSPO_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@pytest.fixture
def learner_env():
    return _learner_env


@pytest.fixture
def learner_settings(redis_url, run_name, model_path, tmp_path):
    """``learner_settings(**over)``: an in-process learner of this test's run (quiet, quick)."""
    from conspo.settings import LearnerSettings

    def make(**over):
        base = dict(
            redis_url=redis_url,
            run=run_name,
            model_path=model_path,
            data_dir=tmp_path,
            lr=1e-3,
            progress_bar=False,
            block_ms=200,
        )
        return LearnerSettings(**{**base, **over})

    return make


@pytest.fixture
def spawn_learner():
    """Start ``python -m conspo.cli learner`` subprocesses; kills leftovers at teardown."""
    procs: list[subprocess.Popen] = []

    def start(env: dict, log: Path) -> subprocess.Popen:
        proc = spawn(["-m", "conspo.cli", "learner"], env=env, log=log)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
