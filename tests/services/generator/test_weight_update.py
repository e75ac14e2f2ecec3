"""Live weight updates: the test process plays the learner (``WeightPublisher`` over gloo) and
pushes new weights into a running ``conspo generator`` subprocess (hf backend); a second test
checks that a late joiner loads the announced checkpoint before its first request.

Evidence that the update really happened comes from teacher forcing: the behaviour log-probs of
the rollouts tagged with the new version must match the NEW weights (1e-4) and not the old ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conspo.models.logprobs import completion_logprobs
from conspo.models.tiny import load_policy, save_model
from conspo.protocol import Prompt, WeightAnnouncement
from conspo.queue import StreamQueue
from conspo.state import RunStore
from conspo.testing import REPO_ROOT, wait_for
from conspo.weight_sync import WeightPublisher, read_members, served_versions
from conspo.weight_sync.membership import write_announcement

TIMEOUT = 90.0


def arith(i: int) -> Prompt:
    a, b = 11 + i, 30 + 2 * i
    return Prompt(prompt_id=f"w{i}", text=f"{a}+{b}=", answer=str(a + b), verifier="arith")


def max_logprob_gap(model: torch.nn.Module, group) -> float:
    prompts = [group.prompt_token_ids] * len(group.completions)
    completions = [c.token_ids for c in group.completions]
    with torch.no_grad():
        logp, _, _ = completion_logprobs(
            model, prompts, completions, temperature=group.sampling.temperature
        )
    gap = 0.0
    for r, c in enumerate(group.completions):
        got = torch.tensor(c.logprobs)
        gap = max(gap, float((got - logp[r, : len(c.logprobs)]).abs().max()))
    return gap


@pytest.fixture
def perturbed(tiny_path: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(old model, new model): the new one is what a learner step would push."""
    old, _ = load_policy(tiny_path)
    new, _ = load_policy(tiny_path)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return old, new


@pytest.mark.slow
def test_broadcast_reaches_a_running_generator(
    redis_url, run_name, redis_client, keys, read_rollouts, perturbed, tmp_path
):
    old, new = perturbed
    env = {
        **os.environ,
        "CONSPO_REDIS_URL": redis_url,
        "CONSPO_RUN": run_name,
        "CONSPO_GROUP_SIZE": "4",
        "CONSPO_MAX_TOKENS": "8",
        "CONSPO_POLL_MS": "50",
        "CONSPO_HEARTBEAT_S": "0.5",
        "CONSPO_WEIGHT_SYNC_TIMEOUT_S": "30",
        "CONSPO_WEIGHT_SYNC_BACKEND": "gloo",
        # No learner announces run settings here: the generator's own limits stand in.
        "CONSPO_BATCH_GROUPS": "32",
        "CONSPO_MAX_STALENESS": "1",
        "CONSPO_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "generator.log"
    queue = StreamQueue(redis_client, keys, "prompts", Prompt)
    with (
        WeightPublisher(redis_client, keys, backend="gloo", timeout_s=30, member_ttl_s=5) as pub,
        open(log, "wb") as out,
    ):
        proc = subprocess.Popen(
            [sys.executable, "-m", "conspo.cli", "generator"],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            for i in range(3):
                queue.publish(arith(i), key=f"w{i}")
            assert wait_for(lambda: len(read_rollouts()) == 3, TIMEOUT), log.read_text()
            assert {g.policy_version for _, g in read_rollouts()} == {0}
            assert wait_for(lambda: len(read_members(redis_client, keys)) == 1, TIMEOUT)
            (instance,) = read_members(redis_client, keys)
            store = RunStore(redis_client, keys)

            def beat_info() -> dict:
                beats = [b for b in store.heartbeats() if b.instance == instance]
                return beats[0].info if beats else {}

            # The learner reads these to spot a generator on its own GPU.
            assert wait_for(lambda: beat_info().get("device") == "cpu", TIMEOUT)
            assert beat_info()["backend"] == "hf"

            report = pub.push(new, version=1, step=1)
            assert report.ok, report
            assert report.receivers == [instance]
            assert wait_for(lambda: served_versions(redis_client, keys).get(instance) == 1, TIMEOUT)

            for i in range(3, 6):
                queue.publish(arith(i), key=f"w{i}")
            assert wait_for(lambda: len(read_rollouts()) == 6, TIMEOUT), log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    assert code == 0, log.read_text()
    groups = [g for _, g in read_rollouts()]
    before = [g for g in groups if g.prompt.prompt_id in {"w0", "w1", "w2"}]
    after = [g for g in groups if g.prompt.prompt_id in {"w3", "w4", "w5"}]
    assert all(g.policy_version == 0 for g in before)
    assert all(g.policy_version == 1 for g in after)
    for g in before:
        assert max_logprob_gap(old, g) < 1e-4
    for g in after:
        assert max_logprob_gap(new, g) < 1e-4
        assert max_logprob_gap(old, g) > 1e-3  # really sampled by the new weights
    assert read_members(redis_client, keys) == {}  # left the group on SIGTERM


def test_a_late_joiner_loads_the_announced_checkpoint_first(
    tiny_path, redis_client, keys, run_loop, read_rollouts, perturbed, tmp_path
):
    from services.generator.backends.hf import HFBackend
    from services.generator.weights import initial_load

    old, new = perturbed
    _, tokenizer = load_policy(tiny_path)
    checkpoint = save_model(new, tokenizer, tmp_path / "step-7")
    write_announcement(
        redis_client,
        keys,
        WeightAnnouncement(
            version=7, step=7, transport="checkpoint", checkpoint_path=str(checkpoint)
        ),
    )
    backend = HFBackend.from_path(tiny_path, device="cpu")
    served = initial_load(redis_client, keys, backend, loaded_version=0)
    assert served == 7
    StreamQueue(redis_client, keys, "prompts", Prompt).publish(arith(0), key="w0")
    with run_loop(backend, served_version=served):
        assert wait_for(lambda: len(read_rollouts()) == 1, TIMEOUT)
    group = read_rollouts()[0][1]
    assert group.policy_version == 7
    assert max_logprob_gap(new, group) < 1e-4
    assert max_logprob_gap(old, group) > 1e-3
