"""Load announced weights from a checkpoint directory: the late joiner's path.

A generator that joined after a push, or whose broadcast failed, cannot ask the learner for a
resend (the learner never waits on one peer); it loads the ``checkpoint_path`` of the
announcement instead. The directory is what ``save_pretrained`` writes: ``model.safetensors``,
or shards listed in ``model.safetensors.index.json``; a single ``.safetensors`` file works too.
Only the template's tensors are read, and each must be present with the template's shape.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from conspo.weight_sync.layout import TensorSource, layout_of

logger = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """``tensor name -> file`` of a safetensors checkpoint (directory or single file)."""
    root = Path(path)
    if root.is_file():
        files = [root]
    elif (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return {name: root / file for name, file in weight_map.items()}
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {root}")
    out: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = file
    return out


def load_checkpoint(
    path: str | Path, template: TensorSource, *, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The template's tensors read from a checkpoint, in template order, checked and cast.

    Raises ``KeyError`` when a tensor is missing and ``ValueError`` on a shape mismatch; a dtype
    difference is cast to the template's dtype (checkpoints are often saved in another one).
    """
    layout = layout_of(template)
    where = checkpoint_files(path)
    missing = [s.name for s in layout.specs if s.name not in where]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"checkpoint {path} lacks {', '.join(missing[:5])}{more}")
    by_file: dict[Path, list[str]] = {}
    for spec in layout.specs:
        by_file.setdefault(where[spec.name], []).append(spec.name)
    loaded: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in names:
                loaded[name] = handle.get_tensor(name)
    out: dict[str, torch.Tensor] = {}
    for spec in layout.specs:
        tensor = loaded[spec.name]
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"checkpoint {path}: {spec.name} has shape {tuple(tensor.shape)}, "
                f"the model expects {spec.shape}"
            )
        if tensor.dtype != spec.dtype:
            logger.debug("casting %s from %s to %s", spec.name, tensor.dtype, spec.dtype)
        out[spec.name] = tensor.to(device=device, dtype=spec.dtype)
    return out
