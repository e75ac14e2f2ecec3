"""One optimizer step on B labelled groups: exact gradient accumulation over whole groups.

The objective's full-batch mean loss is ``sum over groups / denominator`` where the denominator
depends only on the batch layout (``Objective.denominator``). Each micro-batch is a run of whole
groups: forward (teacher forcing with the rollout's sampling temperature, so the log-probs are
those the generator recorded when the weights are equal), loss with ``reduce="sum"`` divided by
the FULL batch's denominator, backward. The accumulated gradient is then exactly the full-batch
gradient while only one micro-batch's activations are alive. Under FSDP2 each rank takes whole
groups, the denominators are global (every rank sees every group's layout), and the loss is
scaled by the world size because FSDP2 averages gradients.

What the objective needs is its ``ObjectiveSpec``'s to say (``conspo.objectives.spec``), and
``ObjectivePlan`` reads it once: which hyper-parameters the settings fill (``tau``, the
reference-KL coefficient, Dr.GRPO's generation budget), whether behaviour log-probs go in, and
who applies the KL to the frozen reference (``kl_beta > 0``): objectives with their own
(``reference_kl``, the GRPO family's ``beta``) receive ``ref_logprobs`` and ``kl_beta``; for the
others (ConSPO, DisCO) the learner adds ``kl_beta * mean_sequences(mean_tokens(k3))``, which is
additive over micro-batches in the same way (divided by the full batch's number of sequences).
That is not ConSPO's and DisCO's behaviour-KL constraint (``kl_constraint_beta``).

Diagnostics are combined over micro-batches and ranks as weighted means: group counts are
summed, ``mean_p_pos`` is weighted by counted positives, ``score_gap`` by valid groups, the
rest by completion tokens. ``mean_p_pos`` is then exact; the per-micro-batch token means are
exact too; ``score_gap`` is exact because micro-batches hold whole groups.

Precision: float32 parameters and optimizer state; bf16 autocast on CUDA only (on CPU bf16 was
measured 3.6x slower), log-softmax always in float32 (``completion_logprobs`` upcasts).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from conspo.models.logprobs import completion_logprobs
from conspo.objectives import Objective, get_objective, k3_kl
from services.learner.data import TrainGroup, assign_to_ranks, plan_micro_batches
from services.learner.distributed import DistContext, set_gradient_sync

log = logging.getLogger(__name__)

_SUM_KEYS = {
    "n_groups",
    "valid_groups",
    "skipped_groups",
    "all_positive_groups",
    "all_negative_groups",
}
_POSITIVE_WEIGHTED = {"mean_p_pos", "mean_p_pos_uniform"}
_GROUP_WEIGHTED = {"score_gap"}
_IGNORED = {"denominator", "margin"}


@dataclass(frozen=True)
class TrainConfig:
    """The subset of LearnerSettings the step needs (kept explicit for tests and ranks)."""

    objective: str = "conspo"
    objective_params: dict[str, Any] = field(default_factory=dict)
    tau: float = 10.0
    margin: float = 0.01
    margin_warmup: float = 0.3
    kl_beta: float = 0.0
    token_budget: int = 16_384
    share_prompts: bool = True
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    total_steps: int = 1000
    bf16: bool = True
    log_entropy: bool = True

    @classmethod
    def from_settings(cls, s: Any) -> TrainConfig:
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(s, k) for k in names if hasattr(s, k)})


@dataclass(frozen=True)
class ObjectivePlan:
    """The objective as this learner runs it, read from its spec once (module doc)."""

    objective: Objective
    #: the reference KL the learner adds itself (0 when the objective applies its own)
    learner_kl_beta: float

    @classmethod
    def of(cls, config: TrainConfig) -> ObjectivePlan:
        base = get_objective(config.objective)
        spec = base.spec
        params = dict(config.objective_params)  # the user's values win over the settings'
        if spec.temperature is not None:
            params.setdefault(spec.temperature, config.tau)
        learner_kl_beta = config.kl_beta
        if spec.reference_kl is not None:
            params.setdefault(spec.reference_kl, config.kl_beta)
            learner_kl_beta = 0.0
        return cls(base.with_options(**params), learner_kl_beta)

    @property
    def uses_margin(self) -> bool:
        return self.objective.margin_schedule is not None

    @property
    def needs_behaviour(self) -> bool:
        return self.objective.needs_old_logprobs

    @property
    def needs_reference(self) -> bool:
        """A frozen reference model must be loaded (for the objective's KL or the learner's)."""
        return self.objective.needs_ref_logprobs or self.learner_kl_beta > 0

    def batch_options(self, groups: Sequence[TrainGroup]) -> dict[str, Any]:
        """Hyper-parameters fixed per step from the whole batch, the same in every micro-batch:
        the generation budget (Dr.GRPO's length constant) unless the user set one."""
        budget = self.objective.spec.generation_budget
        if budget is None or self.objective.defaults.get(budget) is not None or not groups:
            return {}
        return {budget: max(g.max_tokens for g in groups)}


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float
    margin: float
    groups: int
    rows: int
    completion_tokens: int
    forward_tokens: int
    micro_batches: int
    seconds: float
    diagnostics: dict[str, float] = field(default_factory=dict)


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr_schedule {schedule!r}")


class _Rows:
    """A micro-batch flattened to rows, in the order the tensors will have."""

    def __init__(self, groups: Sequence[TrainGroup], weight: float = 1.0) -> None:
        self.groups = list(groups)
        self.weight = weight
        by_temp: dict[float, list[tuple[int, int]]] = {}
        for gi, g in enumerate(self.groups):
            for ci in range(g.size):
                by_temp.setdefault(g.temperature, []).append((gi, ci))
        self.subsets = list(by_temp.items())
        self.order = [row for _, rows in self.subsets for row in rows]

    def tensor(self, fn, dtype, device) -> torch.Tensor:
        return torch.tensor([fn(gi, ci) for gi, ci in self.order], dtype=dtype, device=device)


def _pad_cat(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    out = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
    return torch.cat(out, dim=0)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        ctx: DistContext,
        *,
        ref_model: nn.Module | None = None,
        pad_id: int = 0,
        dummy_ids: tuple[int, int] = (1, 2),
    ) -> None:
        self.config = config
        self.model = model
        self.ref_model = ref_model
        self.ctx = ctx
        self.pad_id = pad_id
        self.dummy_ids = dummy_ids
        self.plan = ObjectivePlan.of(config)
        self.objective = self.plan.objective
        if self.plan.needs_reference and ref_model is None:
            raise ValueError("a KL term needs a reference model")
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=config.lr,
            betas=tuple(config.adam_betas),
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(
                s,
                warmup=config.warmup_steps,
                total=config.total_steps,
                schedule=config.lr_schedule,
            ),
        )

    # -- public -----------------------------------------------------------------------------------
    def margin_at(self, step: int, total_steps: int) -> float:
        # The objective's own schedule: ConSPO's cosine ramp, a constant, or none.
        return self.objective.margin_at(
            step, total_steps, self.config.margin, self.config.margin_warmup
        )

    def step(self, groups: Sequence[TrainGroup], step: int, margin_total_steps: int) -> StepStats:
        """One optimizer step on ``groups`` (every rank passes the same list)."""
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        stats = self.accumulate(groups, step, margin_total_steps)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.grad_norm = float(grad_norm)
        stats.lr = float(lr)
        stats.seconds = time.perf_counter() - start
        return stats

    def accumulate(
        self, groups: Sequence[TrainGroup], step: int, margin_total_steps: int
    ) -> StepStats:
        """Forward/backward over every micro-batch: leaves the full-batch gradient in ``.grad``."""
        start = time.perf_counter()
        margin = self.margin_at(step, margin_total_steps)

        # Full-batch layout: denominators must not depend on how the batch is cut.
        full = _Rows(groups)
        lengths = full.tensor(lambda g, c: len(groups[g].completions[c]), torch.long, "cpu")
        t_full = int(lengths.max()) if len(lengths) else 0
        full_mask = torch.arange(max(t_full, 1))[None, :] < lengths[:, None]
        rewards = full.tensor(lambda g, c: groups[g].rewards[c], torch.float32, "cpu")
        gids = full.tensor(lambda g, c: g, torch.long, "cpu")
        denominator = self.objective.denominator(full_mask, rewards, gids)
        n_rows = max(len(full.order), 1)
        extra = self.plan.batch_options(groups)

        shares = assign_to_ranks(groups, self.ctx.world_size)
        budget = self.config.token_budget
        plans = [plan_micro_batches([groups[i] for i in s], budget) for s in shares]
        n_micro = max((len(p) for p in plans), default=0) or 1
        mine = [[groups[shares[self.ctx.rank][i]] for i in mb] for mb in plans[self.ctx.rank]]
        scale = float(self.ctx.world_size)

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for k in range(n_micro):
            rows = _Rows(mine[k]) if k < len(mine) else self._dummy()
            set_gradient_sync(self.model, k == n_micro - 1)
            with self._autocast():
                loss, diag, w = self._micro_batch(rows, denominator, n_rows, margin, extra)
            (loss * scale).backward()
            loss_total += float(loss.detach())
            for key, (value, weight) in self._weighted(diag, w, rows.weight).items():
                sums[key] = sums.get(key, 0.0) + value * weight
                weights[key] = weights.get(key, 0.0) + weight

        keys = sorted(sums)
        packed = torch.tensor(
            [loss_total] + [sums[k] for k in keys] + [weights[k] for k in keys],
            dtype=torch.float64,
        )
        packed = self.ctx.all_reduce_sum(packed)
        n = len(keys)
        diagnostics = {}
        for i, key in enumerate(keys):
            total_w = float(packed[1 + n + i])
            if key in _SUM_KEYS:
                diagnostics[key] = float(packed[1 + i])
            elif total_w > 0:
                diagnostics[key] = float(packed[1 + i]) / total_w
        return StepStats(
            loss=float(packed[0]),
            grad_norm=float("nan"),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            margin=float(margin),
            groups=len(groups),
            rows=len(full.order),
            completion_tokens=sum(g.completion_tokens for g in groups),
            forward_tokens=sum(g.forward_tokens for g in groups),
            micro_batches=n_micro,
            seconds=time.perf_counter() - start,
            diagnostics=diagnostics,
        )

    @torch.no_grad()
    def sequence_scores(self, groups: Sequence[TrainGroup]) -> list[list[float]]:
        """Length-normalised log-likelihoods per completion under the current policy (no grad;
        world size 1 only: used by tests and tools, not by the step)."""
        out = []
        for g in groups:
            logp, mask, _ = completion_logprobs(
                self.model,
                [list(g.prompt_ids)] * g.size,
                [list(c) for c in g.completions],
                temperature=g.temperature,
                pad_id=self.pad_id,
            )
            out.append(((logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist())
        return out

    # -- internals --------------------------------------------------------------------------------
    def _dummy(self) -> _Rows:
        """A one-row, zero-weight micro-batch: keeps FSDP collectives aligned across ranks."""
        bos, eos = self.dummy_ids
        g = TrainGroup("dummy", (bos,), ((eos,),), ((0.0,),), (0.0,), (False,), 1.0, 1, 0)
        return _Rows([g], weight=0.0)

    def _autocast(self):
        if self.ctx.device.type == "cuda" and self.config.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _logprobs(self, model: nn.Module, rows: _Rows, with_entropy: bool):
        parts, masks, ents = [], [], []
        for temperature, subset in rows.subsets:
            logp, mask, ent = completion_logprobs(
                model,
                [list(rows.groups[gi].prompt_ids) for gi, _ in subset],
                [list(rows.groups[gi].completions[ci]) for gi, ci in subset],
                temperature=temperature,
                token_budget=self.config.token_budget,
                with_entropy=with_entropy,
                share_prompts=self.config.share_prompts,
                pad_id=self.pad_id,
            )
            parts.append(logp)
            masks.append(mask)
            if ent is not None:
                ents.append(ent.detach())
        width = max(p.shape[1] for p in parts)
        logp = _pad_cat(parts, width)
        mask = _pad_cat(masks, width)
        ent = _pad_cat(ents, width) if ents else None
        return logp, mask, ent

    def _micro_batch(
        self,
        rows: _Rows,
        denominator: float,
        n_rows: int,
        margin: float,
        extra: dict[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        device = self.ctx.device
        logp, mask, ent = self._logprobs(self.model, rows, self.config.log_entropy)
        width = logp.shape[1]
        rewards = rows.tensor(lambda g, c: rows.groups[g].rewards[c], torch.float32, device)
        gids = rows.tensor(lambda g, c: g, torch.long, device)
        kwargs: dict[str, Any] = dict(extra)
        plan = self.plan
        if plan.uses_margin:
            kwargs["margin"] = margin
        if plan.needs_behaviour:
            old = [
                list(rows.groups[g].behaviour_logprobs[c]) + [0.0] * width for g, c in rows.order
            ]
            kwargs["old_logprobs"] = torch.tensor(
                [o[:width] for o in old], dtype=torch.float32, device=device
            )
        ref = None
        if plan.needs_reference:
            with torch.no_grad():
                ref, _, _ = self._logprobs(self.ref_model, rows, False)
                ref = torch.nn.functional.pad(ref, (0, width - ref.shape[1]))
            if self.objective.needs_ref_logprobs:
                kwargs["ref_logprobs"] = ref
        loss_sum, diag = self.objective(logp, mask, rewards, gids, reduce="sum", **kwargs)
        loss = loss_sum / denominator
        diag = dict(diag)
        bool_mask = mask > 0
        if plan.learner_kl_beta > 0:
            kl_tok = k3_kl(logp, ref, bool_mask)
            kl_seq = kl_tok.sum(-1) / bool_mask.sum(-1).clamp(min=1)
            loss = loss + plan.learner_kl_beta * kl_seq.sum() / n_rows
            diag["kl_ref"] = kl_seq.detach().mean()
        if ent is not None:
            diag["entropy"] = (ent * mask).sum() / mask.sum().clamp(min=1)
        if rows.weight == 0.0:
            # Dummy rows: the same forward passes (collectives), an exactly zero gradient.
            loss = logp.sum() * 0.0
        w = {
            "tokens": float(mask.sum()),
            "positives": float(sum(g.n_counted_positives for g in rows.groups)),
            "valid": float(sum(1 for g in rows.groups if g.n_counted_positives)),
        }
        return loss, diag, w

    @staticmethod
    def _weighted(
        diag: dict[str, Any], w: dict[str, float], row_weight: float
    ) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for key, value in diag.items():
            if key in _IGNORED:
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):  # keep the key: every rank must reduce the same vector
                out[key] = (0.0, 0.0)
                continue
            if key in _SUM_KEYS:
                weight = 1.0
            elif key in _POSITIVE_WEIGHTED:
                weight = w["positives"]
            elif key in _GROUP_WEIGHTED:
                weight = w["valid"]
            else:
                weight = w["tokens"]
            out[key] = (v, weight * row_weight)
        return out
