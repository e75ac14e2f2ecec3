"""A completion's text is data: graded, never executed or rendered.

Completions that would do something if anything ``eval``'d, ``exec``'d, shelled out or rendered
them as a template (Python, Jinja/ERB/JS templates, shell substitutions, LaTeX shell escapes,
YAML tags) go through a real verifier replica (a subprocess with its grading pool) via the
``rollouts`` stream. Each gold answer is what the payload would evaluate to, so an evaluation
would show up as ``correct``; and a payload that ran would leave a file behind.

(LaTeX is the one language the ``math`` verifier does evaluate, inside its grading process:
``\\boxed{7*7}`` *is* 49 there, and ``{{7*7}}`` in LaTeX is just 7*7 in grouping braces. The
payloads below are not valid math, so a ``math`` verdict other than wrong / no_answer would be a
bug.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from conspo.lineage import VERIFY
from conspo.protocol import (
    Completion,
    LabeledGroup,
    Prompt,
    RolloutGroup,
    SamplingParams,
    Verdict,
)
from conspo.queue import StreamQueue
from conspo.testing import REPO_ROOT, wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(300)]


def _payloads(target: Path) -> list[str]:
    t = str(target)
    return [
        f"__import__('os').system('touch {t}')",
        f"\\boxed{{__import__('os').system('touch {t}')}}",
        f"eval(\"__import__('os').system('touch {t}')\")",
        f"exec(\"open('{t}', 'w').close()\")",
        f"The answer is {{{{ cycler.__init__.__globals__.os.popen('touch {t}').read() }}}}",
        f"{{% set x = cycler.__init__.__globals__.os.system('touch {t}') %}}{{{{ x }}}}",
        "{{7*7}}",
        "{{7*'7'}}",
        "${7*7}",
        "#{7*7}",
        "<%= 7*7 %>",
        f"$(touch {t})",
        f"`touch {t}`",
        f"; touch {t}",
        f"\\immediate\\write18{{touch {t}}}",
        f"\\input{{{t}}}",
        f"!!python/object/apply:os.system ['touch {t}']",
    ]


def _group(i: int, verifier: str, gold: str, texts: list[str]) -> RolloutGroup:
    completions = [
        Completion(token_ids=[1, 2], logprobs=[-0.1, -0.2], text=text, finish_reason="stop")
        for text in texts
    ]
    return RolloutGroup(
        group_id=f"g-inject-{i}",
        prompt=Prompt(
            prompt_id=f"p-inject-{i}", text="What is 7*7?", answer=gold, verifier=verifier
        ),
        prompt_token_ids=[1, 2, 3],
        completions=completions,
        policy_version=0,
        sampling=SamplingParams(n=len(completions)),
    )


def test_hostile_completions_are_graded_without_side_effects(
    redis_client, redis_url, keys, tmp_path
):
    letters = "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex)  # no digits
    target = Path(tempfile.gettempdir()) / f"pwned-{letters}"
    texts = _payloads(target)
    # gold = what a payload evaluates to: 49 (7*7), 7777777 (Jinja 7*'7'), 0 (os.system)
    groups = [
        _group(i, verifier, gold, texts)
        for i, (verifier, gold) in enumerate(
            (v, g) for v in ("arith", "math", "exact") for g in ("49", "7777777", "0")
        )
    ]
    rollouts = StreamQueue(redis_client, keys, "rollouts", RolloutGroup)
    labeled = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    labeled.ensure_group()
    for group in groups:
        rollouts.publish(group, group.group_id)

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "CONSPO_REDIS_URL": redis_url,
        "CONSPO_RUN": keys.run,
        "CONSPO_BLOCK_MS": "100",
        "CONSPO_PROCESSES": "1",
        "CONSPO_TIMEOUT_S": "5",
    }
    log = tmp_path / "verifier.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conspo.cli", "verifier"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        done = wait_for(
            lambda: (
                all(redis_client.exists(keys.done(VERIFY, g.group_id)) for g in groups)
                or proc.poll() is not None
            ),
            timeout=180,
            interval=0.2,
        )
        assert done and proc.poll() is None, log.read_text(errors="replace")[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    seen = 0
    for d in labeled.read("inspector", count=100, block_ms=None):
        for completion, label in zip(d.message.rollout.completions, d.message.labels, strict=True):
            seen += 1
            assert label.verdict in (Verdict.WRONG, Verdict.NO_ANSWER), (
                d.message.rollout.prompt.verifier,
                d.message.rollout.prompt.answer,
                completion.text,
                label,
            )
            assert label.reward == 0.0
    assert seen == len(groups) * len(texts)
    assert not target.exists(), f"a completion was executed: {target} exists"
    assert proc.returncode == 0
