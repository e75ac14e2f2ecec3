"""The CPU install never imports vLLM: the generator package and its modules import without it
(vLLM is loaded lazily, only by the vllm backend), and the light modules not even torch."""

from __future__ import annotations

import sys

import pytest

from conspo.testing import heavy_imports

LIGHT = """
import services.generator
import services.generator.backends
import services.generator.metrics
import services.generator.prompting
from services.generator.backends import build_backend
"""


def test_the_package_imports_neither_vllm_nor_torch():
    assert heavy_imports(LIGHT, ("vllm", "torch", "transformers")) == []


def test_the_service_modules_do_not_import_vllm():
    if any(m == "vllm" or m.startswith("vllm.") for m in sys.modules):
        pytest.skip("vLLM was already imported by another test in this process")
    import services.generator.loop
    import services.generator.main
    import services.generator.vllm_worker
    import services.generator.weights  # noqa: F401

    assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)


def test_the_vllm_backend_fails_clearly_without_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vLLM is installed (the GPU tests exercise it)")
    from services.generator.backends.vllm import VLLMBackend

    with pytest.raises(ImportError):
        VLLMBackend("/nonexistent")
