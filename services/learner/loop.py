"""The SPMD training loop every rank runs: build, step, gather, checkpoint, in lockstep.

Every rank holds the model (sharded by FSDP2 when the world is larger than one), the optimizer
and the ``Progress`` (step, version, margin horizon). Each iteration rank 0's service
(``services.learner.service``) decides a ``StepCommand`` (train these groups / stop / finish)
and broadcasts it; every rank then runs the same step, gathers and saves on the same schedule
(a pure function of the step counter), so collectives line up. Only rank 0 has a service: the
loop hands it what happened between collectives (the step to commit, the checkpoint to write,
the weights to push or evaluate) and never touches Redis itself, so the other ranks need none.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conspo.settings import LearnerSettings
from services.learner.checkpoint import Checkpoint, capture_rng, restore_rng
from services.learner.command import Progress, StepCommand
from services.learner.distributed import (
    DistContext,
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    shard_model,
)
from services.learner.service import FullState, LearnerService
from services.learner.step import ObjectivePlan, TrainConfig, Trainer

log = logging.getLogger(__name__)


def configure_torch(settings: LearnerSettings) -> None:
    """Thread count and deterministic kernels: exact resume needs both fixed."""
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def default_model_path() -> Path:
    from conspo.models import default_checkpoint

    return Path(default_checkpoint())


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers >= 5 renamed the API)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


class TrainingLoop:
    def __init__(
        self, settings: LearnerSettings, ctx: DistContext, service: LearnerService | None = None
    ) -> None:
        """``service`` is rank 0's (None on the other ranks)."""
        if ctx.is_main != (service is not None):
            raise ValueError("rank 0, and only rank 0, runs the learner service")
        self.s = settings
        self.ctx = ctx
        self.service = service
        configure_torch(settings)
        self.config = TrainConfig.from_settings(settings)
        found = service.find_checkpoint() if service is not None else None
        ckpt: Checkpoint | None = ctx.broadcast_object(found)
        self._build_model(ckpt)
        self.progress = (
            Progress(ckpt.state.step, ckpt.state.version, ckpt.state.total_steps)
            if ckpt
            else Progress(0, 0, settings.total_steps)
        )
        if ckpt and ckpt.state.total_steps != settings.total_steps:
            log.warning(
                "total_steps changed from %d to %d: the margin schedule keeps the checkpoint's "
                "horizon (%d); training stops at %d",
                ckpt.state.total_steps,
                settings.total_steps,
                self.progress.margin_total,
                settings.total_steps,
            )
        self.last_ckpt_step = self.progress.step  # nothing to save before the first step
        self.last_eval_step = -1
        if service is not None:
            service.start(ckpt, self.model, self.tokenizer, self.progress, base_path=self.base_path)

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def version(self) -> int:
        return self.progress.version

    # -- set-up -----------------------------------------------------------------------------------
    def _from_main(self, read: Any) -> Any:
        """``read()`` on rank 0 (which holds the checkpoint files), broadcast to every rank."""
        return self.ctx.broadcast_object(read() if self.ctx.is_main else None)

    def _build_model(self, ckpt: Checkpoint | None) -> None:
        from conspo.models.tiny import load_policy

        s, ctx = self.s, self.ctx
        base = Path(s.model_path) if s.model_path else default_model_path()
        self.base_path = base
        # World size 1 loads the checkpoint's weights directly; FSDP2 loads the base on every
        # rank and receives the checkpoint's tensors from rank 0 (no shared filesystem needed).
        first = ckpt.model_dir if (ckpt and not ctx.enabled) else base
        self.model, self.tokenizer = load_policy(first, ctx.device, torch.float32)
        if s.grad_checkpointing:
            _enable_activation_checkpointing(self.model)
        shard_model(self.model, ctx)
        if ckpt and ctx.enabled:
            state = {}
            if ctx.is_main:
                from safetensors.torch import load_file

                for f in sorted(ckpt.model_dir.glob("*.safetensors")):
                    state.update(load_file(f))
            load_full_model_state(self.model, state, ctx)
        ref = None
        if ObjectivePlan.of(self.config).needs_reference:
            ref_path = Path(s.ref_model_path) if s.ref_model_path else base
            ref, _ = load_policy(ref_path, ctx.device, torch.float32)
            ref.requires_grad_(False)
            shard_model(ref, ctx)
            log.info("frozen reference model from %s", ref_path)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        first_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.trainer = Trainer(
            self.config,
            self.model,
            ctx,
            ref_model=ref,
            pad_id=int(pad),
            dummy_ids=(int(first_id or 0), int(tok.eos_token_id or 0)),
        )
        if ckpt:
            optim = ckpt.load_blob("optimizer") if ctx.is_main else {}
            load_full_optimizer_state(self.model, self.trainer.optimizer, optim, ctx)
            self.trainer.scheduler.load_state_dict(
                self._from_main(lambda: ckpt.load_blob("scheduler"))
            )
            restore_rng(self._from_main(lambda: ckpt.load_blob("rng")))

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> str:
        """Train until total_steps (``finished``), a stop request or the data timeout
        (``idle``). Every rank calls this; the return value is rank 0's verdict."""
        s, service = self.s, self.service
        if self.step == 0 and s.eval_every > 0 and s.eval_at_start:
            self._maybe_eval(force=True)
        if self.step > 0:  # announce the resumed version and its checkpoint
            full = self._gather_if_needed(force=True)
            if service is not None:
                service.push_weights(self.progress, full)
        while True:
            command = service.next_command(self.progress) if service is not None else None
            command = self.ctx.broadcast_object(command)
            if not isinstance(command, StepCommand):
                raise TypeError(f"rank 0 sent {command!r}, not a StepCommand")
            if not command.trains:
                return self._finish(command.kind)
            self._train(command)

    def _train(self, command: StepCommand) -> None:
        service, p = self.service, self.progress
        stats = self.trainer.step(command.groups, p.step, p.margin_total)
        self.progress = p = Progress(p.step + 1, p.version + 1, p.margin_total)
        ckpt_s = push_s = eval_s = 0.0
        push_ok = None
        if service is not None:
            service.commit_step(p, len(command.groups))
        full = self._gather_if_needed()
        if p.step % self.s.checkpoint_every == 0:
            ckpt_s = self._checkpoint(full)
        if service is not None and p.step % self.s.push_every == 0:
            outcome = service.push_weights(p, full)
            push_s, push_ok = outcome.seconds, outcome.ok
        if self.s.eval_every and p.step % self.s.eval_every == 0:
            eval_s = self._maybe_eval(full)
        if service is not None:
            timings = {"wait": command.wait_s, "checkpoint": ckpt_s, "push": push_s, "eval": eval_s}
            service.report(p, stats, timings, push_ok)

    # -- gather, checkpoint, evaluate -------------------------------------------------------------
    def _due(self, step: int) -> bool:
        s = self.s
        return (
            step % s.checkpoint_every == 0
            or step % s.push_every == 0
            or bool(s.eval_every and step % s.eval_every == 0)
        )

    def _gather_if_needed(self, force: bool = False) -> FullState:
        """The full weights for checkpoint / push / eval (a collective under FSDP2)."""
        if not self.ctx.enabled or not (force or self._due(self.step)):
            return None
        return full_model_state(self.model, self.ctx)

    def _checkpoint(self, full: FullState) -> float:
        start = time.perf_counter()
        optim = full_optimizer_state(self.model, self.trainer.optimizer, self.ctx)
        if self.service is not None:
            blobs = {
                "optimizer": optim,
                "scheduler": self.trainer.scheduler.state_dict(),
                "rng": capture_rng(),
            }
            self.service.commit_checkpoint(
                self.progress, lambda p: self._write_model(p, full), blobs
            )
        self.last_ckpt_step = self.step
        self.ctx.barrier()
        return time.perf_counter() - start

    def _write_model(self, path: Path, full: FullState) -> None:
        if full is None:
            self.model.save_pretrained(path, safe_serialization=True)
        else:
            # Gathered tensors are copies, so tied weights (lm_head = embeddings) no longer look
            # shared: keep parameters under their first name only, as save_pretrained does.
            names = {n for n, _ in self.model.named_parameters()}
            names |= {n for n, _ in self.model.named_buffers()}
            state = {k: v for k, v in full.items() if k in names}
            self.model.save_pretrained(path, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

    def _maybe_eval(self, full: FullState = None, force: bool = False) -> float:
        if self.last_eval_step == self.step:
            return 0.0
        if force and self.ctx.enabled:
            full = full_model_state(self.model, self.ctx)
        self.last_eval_step = self.step
        if self.service is None:
            return 0.0
        return self.service.evaluate(self.step, full)

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self, reason: str) -> str:
        """Final checkpoint (if anything is uncommitted), final push and eval, state status."""
        service = self.service
        dirty = self.step != self.last_ckpt_step or (service is not None and service.uncommitted)
        dirty = self.ctx.broadcast_object(dirty)
        full = None
        if dirty or reason == "finish":
            full = self._gather_if_needed(force=True)
        if dirty:
            self._checkpoint(full)
        status = "finished" if reason == "finish" else "idle"
        if reason == "finish" and self.s.eval_every:
            self._maybe_eval(full)
        if service is not None:
            service.finish(self.progress, status, full)
        return status

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
