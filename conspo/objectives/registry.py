"""Name -> objective registry, with what the learner needs to micro-batch correctly.

Each objective's batch loss is ``sum_loss / denominator`` where ``sum_loss`` is additive over
whole groups (that is what ``reduce="sum"`` returns) and ``denominator`` depends only on the
batch layout (``mask``, ``rewards``, ``group_ids``). So a learner that splits a batch into
micro-batches of whole groups, calls the objective with ``reduce="sum"`` on each and divides by
``Objective.denominator`` of the *full* batch, accumulates exactly the full-batch mean loss and
gradient. The denominator kinds are:

* ``valid_groups`` (ConSPO ``reduce="mean"``), ``groups`` (ConSPO/DisCO ``"all_groups"``),
* ``sequences`` (GRPO, Dr.GRPO, GSPO, GMPO, SAPO), ``tokens`` (DAPO, CISPO).

ConSPO's ablations (``conspo.objectives.ablations``) are registered next to it. The margin
curriculum is the learner's to apply (it depends on the step), so each entry also says which
margin schedule it wants: ``cosine`` (ConSPO's ramp, ``margin_schedule``), ``constant`` (the
target margin from step 0: ``conspo_fixedmargin``) or none (the objective takes no margin).
``Objective.margin_at`` computes it; the learner passes the result as ``margin=``.

Defaults are read from the functions' keyword-only signatures, so the registry cannot drift
from the code; ``Objective.with_options`` returns a copy with other defaults (and recomputes
whether old / reference log-probs are required).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from conspo.objectives.ablations import conspo_linear, conspo_nomargin, conspo_ratio
from conspo.objectives.cispo import cispo
from conspo.objectives.common import as_bool_mask, binary_group_stats, group_index
from conspo.objectives.conspo import conspo_loss, margin_schedule
from conspo.objectives.disco import disco
from conspo.objectives.grpo import dapo, dr_grpo, grpo
from conspo.objectives.sapo import sapo
from conspo.objectives.sequence import gmpo, gspo

__all__ = ["OBJECTIVES", "Objective", "UnknownObjectiveError", "get_objective"]

ObjectiveFn = Callable[..., tuple[Tensor, dict[str, Any]]]
_DATA_KEYWORDS = frozenset({"old_logprobs", "ref_logprobs"})
MARGIN_SCHEDULES = ("cosine", "constant")


class UnknownObjectiveError(KeyError):
    """Raised by :func:`get_objective` for a name that is not registered."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _denominator(kind: str, mask: Tensor, rewards: Tensor, group_ids: Tensor, reduce: str) -> float:
    if reduce == "sum":
        return 1.0
    if reduce == "all_groups":
        kind = "groups"
    if kind == "sequences":
        return float(max(mask.shape[0], 1))
    if kind == "tokens":
        return float(max(int(as_bool_mask(mask, mask).sum()), 1))
    groups = group_index(group_ids)
    if kind == "groups":
        return float(max(groups.count, 1))
    if kind == "valid_groups":
        return float(max(int(binary_group_stats(rewards, groups, torch.float32).valid.sum()), 1))
    raise ValueError(f"unknown denominator kind {kind!r}")


def _hyper_parameters(fn: ObjectiveFn) -> dict[str, Any]:
    params = inspect.signature(fn).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _DATA_KEYWORDS
    }


@dataclass(frozen=True)
class Objective:
    """A registered objective: ``fn(token_logprobs, mask, rewards, group_ids, **kw)``."""

    name: str
    fn: ObjectiveFn = field(repr=False)
    defaults: Mapping[str, Any] = field(compare=False)
    needs_old_logprobs: bool
    needs_ref_logprobs: bool
    denominator_kind: str
    #: ``"cosine"``, ``"constant"`` or None (no ``margin`` keyword): see the module doc.
    margin_schedule: str | None = None

    def __call__(
        self, token_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor, **kwargs
    ) -> tuple[Tensor, dict[str, Any]]:
        """Call ``fn`` with the registered defaults overridden by ``kwargs``."""
        return self.fn(token_logprobs, mask, rewards, group_ids, **{**self.defaults, **kwargs})

    def _options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"{self.name}: unknown hyper-parameter(s) {unknown}; valid: {sorted(self.defaults)}"
            )
        return {**self.defaults, **options}

    def denominator(self, mask: Tensor, rewards: Tensor, group_ids: Tensor, **options) -> float:
        """What the mean loss of this batch divides by (1.0 for ``reduce="sum"``)."""
        merged = self._options(options)
        reduce = str(merged.get("reduce", "mean"))
        return _denominator(self.denominator_kind, mask, rewards, group_ids, reduce)

    def with_options(self, **options) -> Objective:
        """Copy with other defaults (unknown names raise ``TypeError``)."""
        return _make(
            self.name, self.fn, self.denominator_kind, self.margin_schedule, self._options(options)
        )

    def margin_at(self, step: int, total_steps: int, target: float, warmup_ratio: float) -> float:
        """The margin for optimizer step ``step`` of ``total_steps`` (0 without a margin)."""
        if self.margin_schedule == "cosine":
            return margin_schedule(step, total_steps, target, warmup_ratio)
        if self.margin_schedule == "constant":
            return float(target)
        return 0.0


def _requirements(fn: ObjectiveFn, d: Mapping[str, Any]) -> tuple[bool, bool]:
    """(needs old log-probs, needs reference log-probs) under the hyper-parameters ``d``."""
    if "kl_constraint" in d:  # ConSPO and its margin ablations: only for the KL option
        return bool(d["kl_constraint"]), False
    if fn is disco:
        return d["kl_beta"] != 0.0, False
    if fn is conspo_linear:  # log-likelihood scores only
        return False, False
    return True, d.get("beta", 0.0) != 0.0


def _make(
    name: str, fn: ObjectiveFn, kind: str, schedule: str | None, defaults: Mapping[str, Any]
) -> Objective:
    if (schedule is not None) != ("margin" in defaults) or schedule not in (
        *MARGIN_SCHEDULES,
        None,
    ):
        raise ValueError(f"{name}: margin schedule {schedule!r} does not fit its hyper-parameters")
    needs_old, needs_ref = _requirements(fn, defaults)
    frozen = MappingProxyType(dict(defaults))
    return Objective(name, fn, frozen, needs_old, needs_ref, kind, schedule)


_SPECS: tuple[tuple[str, ObjectiveFn, str, str | None], ...] = (
    ("conspo", conspo_loss, "valid_groups", "cosine"),
    ("conspo_linear", conspo_linear, "valid_groups", "cosine"),
    ("conspo_ratio", conspo_ratio, "valid_groups", "cosine"),
    ("conspo_nomargin", conspo_nomargin, "valid_groups", None),
    ("conspo_fixedmargin", conspo_loss, "valid_groups", "constant"),
    ("grpo", grpo, "sequences", None),
    ("dr_grpo", dr_grpo, "sequences", None),
    ("dapo", dapo, "tokens", None),
    ("disco", disco, "valid_groups", None),
    ("gspo", gspo, "sequences", None),
    ("gmpo", gmpo, "sequences", None),
    ("cispo", cispo, "tokens", None),
    ("sapo", sapo, "sequences", None),
)

#: Read-only ``name -> Objective`` mapping of every registered objective.
OBJECTIVES: Mapping[str, Objective] = MappingProxyType(
    {
        name: _make(name, fn, kind, schedule, _hyper_parameters(fn))
        for name, fn, kind, schedule in _SPECS
    }
)


def get_objective(name: str) -> Objective:
    """Look up an objective by name; unknown names raise :class:`UnknownObjectiveError`."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        valid = ", ".join(OBJECTIVES)
        raise UnknownObjectiveError(f"unknown objective {name!r}; valid: {valid}") from None
