"""Both engines meet the protocol the generator's loop and weight path are written against.

Checked on the classes, structurally (every member the protocol declares, methods with the
protocol's parameters), so the vLLM backend is checked without vLLM: its module imports vLLM
only when an engine is built. The weight path (``services.generator.weights``) picks its follower
from the same protocols, so a backend that lost a member would be routed wrongly, not fail."""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import pytest

from services.generator.backends.base import Backend, EngineBackend
from services.generator.backends.hf import HFBackend
from services.generator.backends.vllm import VLLMBackend


def protocol_members(protocol: type) -> tuple[set[str], dict[str, Any]]:
    """(data members, methods) a protocol declares, its bases' included."""
    data: set[str] = set()
    methods: dict[str, Any] = {}
    for base in reversed(protocol.__mro__):
        if base in (object, Protocol) or Protocol not in base.__mro__[1:]:
            continue
        data.update(getattr(base, "__annotations__", {}))
        methods.update(
            {n: f for n, f in vars(base).items() if inspect.isfunction(f) and n[0] != "_"}
        )
    return data, methods


def declared(cls: type, name: str) -> bool:
    """``name`` is a class attribute, a property or an annotated instance attribute of ``cls``."""
    return any(name in vars(k) or name in getattr(k, "__annotations__", {}) for k in cls.__mro__)


def parameters(function: Any) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


def missing(cls: type, protocol: type) -> list[str]:
    data, methods = protocol_members(protocol)
    out = [f"attribute {name}" for name in sorted(data) if not declared(cls, name)]
    for name, spec in sorted(methods.items()):
        impl = getattr(cls, name, None)
        if not callable(impl):
            out.append(f"method {name}")
        elif parameters(impl) != parameters(spec):
            out.append(f"{name}{inspect.signature(impl)} != {name}{inspect.signature(spec)}")
    return out


def test_the_protocols_declare_what_the_weight_path_uses():
    data, methods = protocol_members(EngineBackend)
    assert {"device", "weight_template", "receives_broadcast", "tokenizer"} <= data
    assert {"load_checkpoint", "load_weights", "start_receive", "apply_received"} <= set(methods)
    assert "receives_broadcast" not in protocol_members(Backend)[0]


@pytest.mark.parametrize(
    ("cls", "protocol"), [(HFBackend, Backend), (VLLMBackend, EngineBackend)], ids=["hf", "vllm"]
)
def test_each_backend_meets_its_protocol(cls: type, protocol: type):
    assert missing(cls, protocol) == []


def test_the_check_sees_a_missing_or_changed_member():
    class Partial:
        name = "partial"

        def generate(self, prompts):  # no params, no stop_event
            return []

    problems = missing(Partial, Backend)
    assert "attribute device" in problems and "method close" in problems
    assert any(p.startswith("generate(") for p in problems)
    assert missing(HFBackend, EngineBackend) != []  # hf holds its weights in this process


def test_a_live_hf_backend_is_routed_in_process(hf_backend):
    assert isinstance(hf_backend, Backend) and not isinstance(hf_backend, EngineBackend)
    assert hf_backend.device.type == "cpu"
    names = [name for name, _ in hf_backend.weight_template]
    assert names == [name for name, _ in hf_backend.model.named_parameters()]
