"""The vLLM weight path without vLLM: ``ConspoWorkerExtension`` mixed into a stand-in worker
whose model loads weights by Hugging Face name (as vLLM's ``load_weights`` does), driven through
``EngineReceiver`` and a ``WeightSubscriber`` exactly as the vLLM backend drives it over
``collective_rpc``, with a real ``WeightPublisher`` over gloo. What cannot run here (vLLM's RPC,
NCCL, the engine itself) is covered by the GPU tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conspo.models.tiny import load_policy, save_model
from conspo.protocol import Rendezvous, WeightAnnouncement
from conspo.testing import wait_for
from conspo.weight_sync import WeightPublisher, WeightSubscriber, read_members
from conspo.weight_sync.membership import write_announcement
from services.generator.backends.templates import specs_of, template_from_config
from services.generator.vllm_worker import ConspoWorkerExtension
from services.generator.weights import EngineReceiver, engine_applier

TIMEOUT = 60.0


class NameLoadingModel:
    """Loads (name, tensor) pairs into an HF model, like a vLLM model's ``load_weights``.
    ``fail_next = k`` breaks the next load after k tensors (a load failing midway, once);
    ``broken`` breaks every load."""

    def __init__(self, hf: torch.nn.Module) -> None:
        self.hf = hf
        self.fail_next: int | None = None
        self.broken = False

    def load_weights(self, weights: Any) -> set[str]:
        params = dict(self.hf.named_parameters())
        loaded = set()
        with torch.no_grad():
            for name, tensor in weights:
                if self.broken or (self.fail_next is not None and len(loaded) == self.fail_next):
                    self.fail_next = None
                    raise RuntimeError("out of memory (simulated)")
                params[name].copy_(tensor)
                loaded.add(name)
        return loaded


class StandInWorker(ConspoWorkerExtension):
    def __init__(self, hf: torch.nn.Module) -> None:
        self.model_runner = SimpleNamespace(model=NameLoadingModel(hf))
        self.device = torch.device("cpu")


class InProcessEngine:
    """The part of ``VLLMBackend`` the weight path uses, calling the worker directly."""

    name = "vllm"
    receives_broadcast = True

    def __init__(self, worker: StandInWorker, template: list) -> None:
        self.worker = worker
        self.specs = specs_of(template)
        self.applied: list[int] = []

    def start_receive(self, ticket, rdv: Rendezvous, rank: int, *, version: int, timeout_s: float):
        args = (ticket, rdv.model_dump(), rank, self.specs, version, timeout_s)
        assert self.worker.conspo_receive_start(*args)["ok"]

    def poll_receive(self, ticket: str) -> dict:
        return self.worker.conspo_receive_poll(ticket)

    def leave_weight_group(self, rdv: Rendezvous) -> None:
        self.worker.conspo_leave_group(rdv.model_dump())

    def apply_received(self, ticket: str) -> None:
        result = self.worker.conspo_apply_staged(ticket)
        assert result["ok"], result
        self.applied.append(ticket)

    def load_checkpoint(self, path: str) -> None:
        result = self.worker.conspo_load_checkpoint(str(path))
        assert result["ok"], result


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pb = dict(b.named_parameters())
    return all(torch.equal(p, pb[n]) for n, p in a.named_parameters())


@pytest.fixture
def models(tiny_path: Path):
    served, _ = load_policy(tiny_path)
    new, tokenizer = load_policy(tiny_path)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    old, _ = load_policy(tiny_path)
    return served, new, old, tokenizer


def test_worker_receives_stages_then_applies_a_push_and_a_checkpoint(
    tiny_path, redis_client, keys, models, tmp_path
):
    served, new, old, tokenizer = models
    template = template_from_config(tiny_path, torch.float32)
    engine = InProcessEngine(StandInWorker(served), template)
    apply = engine_applier(engine)
    subscriber = WeightSubscriber(
        redis_client,
        keys,
        "engine-1",
        backend="gloo",
        timeout_s=30,
        heartbeat_s=0.5,
        receiver=EngineReceiver(engine, timeout_s=30),
    )
    try:
        subscriber.start(template)
        with WeightPublisher(redis_client, keys, backend="gloo", timeout_s=30) as pub:
            assert wait_for(lambda: "engine-1" in read_members(redis_client, keys), TIMEOUT)
            report = pub.push(new, version=1, step=1)
            assert report.ok and report.receivers == ["engine-1"], report
            taken: list = []
            assert wait_for(lambda: taken.append(subscriber.take_staged()) or taken[-1], TIMEOUT)
            assert same_weights(served, old)  # staged only: the live model is untouched
            staged = taken[-1]
            assert (staged.version, staged.source) == (1, "broadcast")
            apply(staged)
            assert engine.applied == [staged.ticket]
            assert same_weights(served, new)
            assert subscriber.epoch == report.epoch
            assert len(engine.worker._conspo_state()["groups"]) == 1  # the worker holds it

            # The learner moves on with a checkpoint only: the worker leaves the group and
            # loads the checkpoint when the loop applies it.
            path = save_model(old, tokenizer, tmp_path / "v2")
            write_announcement(
                redis_client,
                keys,
                WeightAnnouncement(
                    version=2, step=2, transport="checkpoint", checkpoint_path=str(path)
                ),
            )
            taken.clear()
            assert wait_for(lambda: taken.append(subscriber.take_staged()) or taken[-1], TIMEOUT)
            staged = taken[-1]
            assert (staged.version, staged.source) == (2, "checkpoint")
            assert engine.worker._conspo_state()["groups"] == {}  # left the abandoned group
            apply(staged)
            assert same_weights(served, old)
    finally:
        subscriber.close()


def test_apply_refuses_a_version_that_is_not_staged(tiny_path, models):
    served, *_ = models
    worker = StandInWorker(served)
    result = worker.conspo_apply_staged("no-such-ticket")
    assert not result["ok"] and "not staged" in result["error"]


def test_a_load_that_fails_midway_puts_the_previous_version_back(tiny_path, models):
    from services.generator.vllm_worker import pack_tensors

    served, new, old, _ = models
    worker = StandInWorker(served)
    template = template_from_config(tiny_path, torch.float32)
    assert worker.conspo_set_template(specs_of(template), str(tiny_path))["ok"]
    assert worker.conspo_load_tensors(pack_tensors(new.named_parameters()))["ok"]
    assert same_weights(served, new)

    newer = {n: p.detach() * 0.5 for n, p in old.named_parameters()}
    worker.model_runner.model.fail_next = 5  # five tensors of ``newer`` land, then it breaks
    result = worker.conspo_load_tensors(pack_tensors(newer.items()))
    assert not result["ok"] and result["restored"], result
    assert "out of memory" in result["error"]
    assert same_weights(served, new)  # all of the previous version, none of the broken one

    # Refused before anything is copied: a wrong shape, an unknown name.
    bad = dict(newer)
    name = next(iter(bad))
    bad[name] = bad[name][:-1]
    result = worker.conspo_load_tensors(pack_tensors(bad.items()))
    assert result["refused"] and "shape" in result["error"]
    result = worker.conspo_load_tensors(pack_tensors([("no.such.weight", torch.zeros(1))]))
    assert result["refused"] and "unknown parameter" in result["error"]
    assert same_weights(served, new)


def test_a_failed_restore_reports_the_engine_dead(tiny_path, models):
    from services.generator.vllm_worker import pack_tensors

    served, new, _, _ = models
    worker = StandInWorker(served)
    template = template_from_config(tiny_path, torch.float32)
    worker.conspo_set_template(specs_of(template), str(tiny_path))
    worker.model_runner.model.broken = True
    result = worker.conspo_load_tensors(pack_tensors(new.named_parameters()))
    assert not result["ok"] and result["dead"], result
