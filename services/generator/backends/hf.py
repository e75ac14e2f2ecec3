"""The ``hf`` backend: transformers in this process, for CPU runs, tests and the embedded demo.

It wraps ``conspo.models`` (``load_policy``, ``sample_groups``) so that the sampling semantics
(behaviour log-probs before top-p, EOS kept, stop-string rule, private ``torch.Generator``) are
defined once, next to the teacher forcing that must reproduce them.

Seeds. ``sample_groups`` draws a whole call from one generator, so a group's completions depend on
the other prompts of its call. ``seed_mode`` chooses the trade-off:

- ``"group"`` (exact): every seeded prompt is sampled in a call of its own, so a group's seed alone
  reproduces it, whatever batch the prompt lands in on a redo. Costs the batching: on a 2-core CPU
  and the tiny model, several times fewer tokens/s than one call for the batch.
- ``"batch"`` (throughput): prompts with equal sampling settings share one call whose seed mixes
  their seeds; the same batch reproduces exactly, a redo in another batch does not. A batch of one
  uses the group's seed unchanged, so it then matches ``"group"``.

Unseeded prompts are always batched. Weight loads validate every name and shape first and copy
under ``no_grad`` afterwards, so a bad push never leaves a half-updated model.

Threads. On CPU the backend sets torch's intra-op threads (``cpu_threads``, default 1). Measured
on the 2-core build machine while other services ran (load ~8): 16 groups of the tiny model took
0.3-0.6 s with one thread and 2-8 s with two, because OpenMP's spinning workers fight the other
processes for the cores; the tiny model's operations are too small to gain from two threads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from conspo.models.tiny import context_length
from conspo.protocol import Completion, SamplingParams
from services.generator.backends.base import BackendError, WeightLoadError, per_prompt
from services.generator.backends.templates import TensorList, sync_dtype, template_from_model

log = logging.getLogger(__name__)

SeedMode = Literal["group", "batch"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 measured ~3.6x slower there); bf16 on a GPU that supports it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def mix_seeds(seeds: Sequence[int]) -> int:
    """One 31-bit seed from several (order matters); a single seed maps to itself."""
    if len(seeds) == 1:
        return int(seeds[0])
    digest = hashlib.blake2b(",".join(map(str, seeds)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


class HFBackend:
    """``Backend`` over a transformers causal LM (see ``backends.base`` for the contract)."""

    name = "hf"
    tokenizer: Any
    max_model_len: int

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        seed_mode: SeedMode = "group",
        max_batch_rows: int | None = None,
        weight_sync_dtype: str = "auto",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.seed_mode: SeedMode = seed_mode
        self.max_batch_rows = max_batch_rows
        self.max_model_len = context_length(model, tokenizer)
        self.weight_sync_dtype = weight_sync_dtype
        self._lock = threading.Lock()  # generate / load_weights never interleave

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        dtype: torch.dtype | None = None,
        seed_mode: SeedMode = "group",
        max_batch_rows: int | None = None,
        cpu_threads: int = 1,
        weight_sync_dtype: str = "auto",
    ) -> HFBackend:
        from conspo.models.tiny import load_policy

        dev = resolve_device(device)
        if dev.type == "cpu" and cpu_threads > 0:
            torch.set_num_threads(cpu_threads)
        model, tokenizer = load_policy(path, device=dev, dtype=dtype or default_dtype(dev))
        log.info(
            "hf backend: %s on %s (%s), context %d",
            path,
            dev,
            next(model.parameters()).dtype,
            context_length(model, tokenizer),
        )
        return cls(
            model,
            tokenizer,
            seed_mode=seed_mode,
            max_batch_rows=max_batch_rows,
            weight_sync_dtype=weight_sync_dtype,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def weight_template(self) -> TensorList:
        """The parameters in the LEARNER's dtype, not the engine's own (bf16 on a GPU):
        ``load_weights`` casts on receipt."""
        return template_from_model(self.model, sync_dtype(self.weight_sync_dtype))

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        *,
        stop_event: threading.Event | None = None,
    ) -> list[list[Completion]]:
        """G completions per prompt. ``stop_event`` is ignored: a CPU batch is short, and the
        loop finishes it rather than throwing the work away."""
        from conspo.models.sampling import sample_groups

        all_params = per_prompt(params, len(prompts))
        out: list[list[Completion] | None] = [None] * len(prompts)
        for indices, call_params, seed in self._plan(all_params):
            try:
                with self._lock:
                    groups = sample_groups(
                        self.model,
                        self.tokenizer,
                        [prompts[i] for i in indices],
                        n=call_params.n,
                        temperature=call_params.temperature,
                        top_p=call_params.top_p,
                        max_new_tokens=call_params.max_tokens,
                        stop=call_params.stop,
                        seed=seed,
                        max_batch_rows=self.max_batch_rows,
                    )
            except (RuntimeError, ValueError, IndexError) as exc:
                raise BackendError(f"hf generate failed: {type(exc).__name__}: {exc}") from exc
            for i, group in zip(indices, groups, strict=True):
                out[i] = [
                    Completion(
                        token_ids=s.token_ids,
                        logprobs=s.logprobs,
                        text=s.text,
                        finish_reason=s.finish_reason,
                    )
                    for s in group
                ]
        missing = [i for i, g in enumerate(out) if g is None]
        if missing:
            raise BackendError(f"no completions for prompts {missing}")
        return [g for g in out if g is not None]

    def _plan(
        self, params: list[SamplingParams]
    ) -> list[tuple[list[int], SamplingParams, int | None]]:
        """Calls to make: (prompt indices, shared params, call seed)."""
        buckets: dict[tuple, list[int]] = {}
        calls: list[tuple[list[int], SamplingParams, int | None]] = []
        for i, p in enumerate(params):
            if p.seed is not None and self.seed_mode == "group":
                calls.append(([i], p, p.seed))
                continue
            key = (p.n, p.temperature, p.top_p, p.max_tokens, tuple(p.stop), p.seed is None)
            buckets.setdefault(key, []).append(i)
        for indices in buckets.values():
            first = params[indices[0]]
            seeds = [params[i].seed for i in indices]
            seed = None if seeds[0] is None else mix_seeds([int(s) for s in seeds])  # type: ignore[arg-type]
            calls.append((indices, first, seed))
        calls.sort(key=lambda c: c[0][0])
        return calls

    # -- weights ----------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> None:
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        targets = self.model.state_dict(keep_vars=True)
        problems = []
        for name, tensor in items:
            target = targets.get(name)
            if target is None:
                problems.append(f"unknown parameter {name!r}")
            elif tuple(target.shape) != tuple(tensor.shape):
                problems.append(f"{name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        if problems:
            raise WeightLoadError("; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
        with self._lock, torch.no_grad():
            for name, tensor in items:
                target = targets[name]
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
        log.debug("hf backend: loaded %d tensors", len(items))

    def load_checkpoint(self, path: str | Path) -> None:
        """Load a ``save_pretrained`` directory (the learner's checkpoint) by parameter name."""
        from conspo.weight_sync import load_checkpoint

        self.load_weights(load_checkpoint(path, self.model, device="cpu"))

    def device_info(self) -> dict[str, str]:
        param = next(self.model.parameters())
        device = param.device
        info = {"device": str(device), "dtype": str(param.dtype).removeprefix("torch.")}
        if device.type == "cuda":
            info["gpu_uuid"] = str(torch.cuda.get_device_properties(device).uuid)
        return info

    def close(self) -> None:
        self.model = None
