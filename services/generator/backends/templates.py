"""What an engine expects from the learner: the (name, tensor) list of one push, as a template.

A template fixes names, shapes and dtypes (``conspo.weight_sync.layout_of`` hashes it), so the
learner and every generator must build the same one: Hugging Face parameter names in
``named_parameters`` order, in the learner's dtype (``sync_dtype``), whatever the engine serves
in (both backends cast on load).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from conspo.weight_sync.layout import dtype_from_name, dtype_name

TensorList = list[tuple[str, torch.Tensor]]


def sync_dtype(setting: str) -> torch.dtype:
    """The dtype the learner sends: a generator's ``weight_sync_dtype`` (``auto``: float32, the
    learner's default), whatever dtype its engine serves in; both backends cast on load."""
    return torch.float32 if setting == "auto" else dtype_from_name(setting)


def template_from_model(model: torch.nn.Module, dtype: torch.dtype | None = None) -> TensorList:
    """The (name, tensor) list the learner sends for this architecture: ``named_parameters`` (tied
    weights once). With ``dtype``, meta tensors of that dtype stand in (no memory)."""
    out = []
    for name, p in model.named_parameters():
        if dtype is None or p.dtype == dtype:
            out.append((name, p.detach()))
        else:
            out.append((name, torch.empty(p.shape, dtype=dtype, device="meta")))
    return out


def template_from_config(model_path: str | Path, dtype: torch.dtype) -> TensorList:
    """The Hugging Face parameter list of the model at ``model_path``, as meta tensors.

    The vLLM engine's own parameters are fused and sharded (``qkv_proj``, ``gate_up_proj``);
    the learner sends Hugging Face names, which vLLM's ``load_weights`` maps. So the template is
    built from the checkpoint's config on the meta device: names, shapes and dtype, no memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return [(n, p.detach()) for n, p in model.named_parameters()]


def specs_of(template: TensorList) -> list[list[Any]]:
    """A plain-data description of a template (crosses vLLM's RPC without pickling)."""
    return [[name, list(t.shape), dtype_name(t.dtype)] for name, t in template]


def template_from_specs(specs: list[list[Any]]) -> TensorList:
    return [
        (str(name), torch.empty(tuple(shape), dtype=dtype_from_name(dt), device="meta"))
        for name, shape, dt in specs
    ]
