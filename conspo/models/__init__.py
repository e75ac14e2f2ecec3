"""The model layer shared by the generator (sampling) and the learner (teacher forcing).

Modules: `tokenizer` (character-level tokenizer), `tiny` (tiny Qwen2-style model, save/load of
any local HF causal LM), `sampling` (batched group sampling with behaviour log-probs),
`logprobs` (teacher-forced completion log-probs), `sft` (warm start and evaluation).

This package root stays import-light (no torch / transformers at import time): it only locates
a task's committed warm-start checkpoint (`conspo.tasks.registry`) and retrains one on request.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def default_checkpoint(task: str | None = None) -> Path:
    """The committed warm-start checkpoint of a bundled task (default `arith`:
    `conspo/assets/tiny-arith`), a `from_pretrained` directory with `recipe.json`."""
    from conspo.tasks.registry import get_task

    return get_task(task).checkpoint


def cache_dir() -> Path:
    """Where retrained checkpoints go: the ``cache_dir`` setting (`$CONSPO_CACHE_DIR`), else
    `$XDG_CACHE_HOME/conspo`, else `~/.cache/conspo`."""
    from conspo.settings import CommonSettings, load

    if (configured := load(CommonSettings).cache_dir) is not None:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conspo"


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file()


def ensure_checkpoint(
    path: Path | None = None, fresh: bool = False, task: str | None = None, **warm_start_kwargs
) -> Path:
    """A usable checkpoint directory for a bundled task (default `arith`).

    - `fresh=False`: `path` if it already holds a checkpoint, else the task's committed one
      when `path` is None; a `path` without a checkpoint is trained into.
    - `fresh=True`: run the task's warm start (`conspo.models.sft.warm_start` with the task's
      recipe; keyword arguments override it, e.g. `seed`, `steps`) into `path`, or into
      `cache_dir()/<asset>-seed{seed}` (e.g. `tiny-arith-seed1`) when `path` is None, and
      return that directory.
    """
    from conspo.tasks.registry import get_task

    spec = get_task(task)
    if not fresh:
        if path is None and _is_checkpoint(spec.checkpoint):
            return spec.checkpoint
        if path is not None and _is_checkpoint(Path(path)):
            return Path(path)
    from conspo.models.sft import DEFAULT_SEED, warm_start

    seed = int(warm_start_kwargs.get("seed", spec.warm_start.get("seed", DEFAULT_SEED)))
    target = Path(path) if path is not None else cache_dir() / f"{spec.asset}-seed{seed}"
    logger.info("training a %s warm-start checkpoint into %s", spec.name, target)
    warm_start(target, task=spec.name, **warm_start_kwargs)
    return target
