"""One code path for one process and for torchrun + FSDP2.

A plain ``conspo learner`` runs with world size 1: no process group, no sharding, and every
helper here degenerates to the identity. Under ``torchrun`` (``WORLD_SIZE > 1``) the policy (and
the frozen reference) are wrapped with FSDP2 ``fully_shard`` per decoder layer and at the root,
on NCCL with GPUs or gloo on CPU; rank 0 alone talks to Redis and broadcasts each step's command
(train these groups / stop) so the ranks never disagree about what happens next.

Gradients: FSDP2 averages them over ranks, but each rank's loss is already its share of the
global mean (divided by the full-batch denominator), so the loss is multiplied by the world size
(gloo has no PREMUL_SUM, so ``set_gradient_divide_factor(1)`` is not an option on CPU).

State dicts for checkpoints, pushes and evaluation are gathered as full (unsharded) tensors on
rank 0 with ``torch.distributed.checkpoint.state_dict``; with world size 1 the model's is the
live module's ``state_dict``. Optimizer state always goes through those helpers, keyed by
parameter name, so checkpoints move between world sizes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # -- collectives (identity for world size 1) -------------------------------------------------
    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return tensor
        out = tensor.detach().to(self.device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device_setting: str, timeout_s: float = 1800.0) -> DistContext:
    """World size 1 unless launched by torchrun with ``WORLD_SIZE > 1``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_setting, local_rank)
    if world_size <= 1:
        return DistContext(device=device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world_size,))
    ctx = DistContext(dist.get_rank(), world_size, local_rank, device, mesh)
    log.info("rank %d/%d on %s (%s)", ctx.rank, world_size, device, backend)
    return ctx


def shard_model(model: nn.Module, ctx: DistContext, *, reshard_after_forward: bool = True) -> None:
    """FSDP2: each decoder layer is a unit, the root holds embeddings, norm and head."""
    if not ctx.enabled:
        return
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=ctx.mesh, reshard_after_forward=reshard_after_forward)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers"):
        obj: Any = model
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    return []


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip FSDP2's reduce-scatter on all but the last micro-batch (no-op without FSDP2)."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(enabled)


def full_model_state(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers on rank 0 (empty dict on other ranks)."""
    if not ctx.enabled:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor], ctx: DistContext):
    if not ctx.enabled:
        model.load_state_dict(state, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if ctx.is_main:
        # Checkpoints hold tied weights once (lm_head = embeddings, as save_pretrained writes
        # them), so the check is on parameters under their first name, then non-strict loading.
        missing = sorted({n for n, _ in model.named_parameters()} - state.keys())
        if missing:
            raise KeyError(f"checkpoint lacks parameters {missing[:5]}")
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, state if ctx.is_main else {}, options=opts)


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext
) -> dict[str, Any]:
    """Optimizer state keyed by parameter names (not indices), unsharded, on rank 0: the same
    format for any world size, so a checkpoint resumes on a different number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ctx: DistContext
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=ctx.enabled)
    mine = state if (ctx.is_main or not ctx.enabled) else {}
    set_optimizer_state_dict(model, optimizer, mine, options=opts)
