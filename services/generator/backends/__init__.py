"""Generation engines behind one interface (``Backend``); see ``base`` for the contract.

``build_backend`` imports the chosen implementation lazily: the CPU install has no vLLM, and
``import services.generator`` must work there (and stay cheap) whatever the settings say.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from services.generator.backends.base import (
    Backend,
    BackendDeadError,
    BackendError,
    EngineBackend,
    GenerationCancelledError,
    WeightLoadError,
    per_prompt,
)

if TYPE_CHECKING:
    from conspo.settings import GeneratorSettings

__all__ = [
    "Backend",
    "BackendDeadError",
    "BackendError",
    "EngineBackend",
    "GenerationCancelledError",
    "WeightLoadError",
    "build_backend",
    "model_path_of",
    "per_prompt",
]


def model_path_of(settings: GeneratorSettings) -> Path:
    """The configured model directory, else the bundled warm-started tiny model."""
    if settings.model_path is not None:
        return Path(settings.model_path)
    from conspo.models import default_checkpoint

    return Path(default_checkpoint())


def build_backend(settings: GeneratorSettings) -> Backend:
    path = model_path_of(settings)
    if settings.backend == "hf":
        from services.generator.backends.hf import HFBackend

        return HFBackend.from_path(
            path,
            device=settings.device,
            seed_mode=settings.hf_seed_mode,
            cpu_threads=settings.cpu_threads,
            weight_sync_dtype=settings.weight_sync_dtype,
        )
    if settings.backend == "vllm":
        from services.generator.backends.vllm import VLLMBackend

        return VLLMBackend.from_settings(path, settings)
    raise ValueError(f"unknown backend {settings.backend!r}")
