"""Name -> objective registry: each name is an ``ObjectiveSpec`` declared beside its function.

What an objective needs (behaviour / reference log-probs, which learner settings fill which
hyper-parameters, its margin schedule, its denominator) is its spec's to say
(``conspo.objectives.spec``); ``register`` refuses anything else and checks the spec against
the function's signature, and ``Objective`` answers from the spec, so neither the registry nor
the learner guesses from names or keyword arguments.

Each objective's batch loss is ``sum_loss / denominator`` where ``sum_loss`` is additive over
whole groups (that is what ``reduce="sum"`` returns) and ``denominator`` depends only on the
batch layout (``mask``, ``rewards``, ``group_ids``). So a learner that splits a batch into
micro-batches of whole groups, calls the objective with ``reduce="sum"`` on each and divides by
``Objective.denominator`` of the *full* batch, accumulates exactly the full-batch mean loss and
gradient. The denominator kinds are:

* ``valid_groups`` (ConSPO ``reduce="mean"``), ``groups`` (ConSPO/DisCO ``"all_groups"``),
* ``sequences`` (GRPO, Dr.GRPO, GSPO, GMPO, SAPO), ``tokens`` (DAPO, CISPO).

ConSPO's ablations (``conspo.objectives.ablations``) are registered next to it. The margin
curriculum is the learner's to apply (it depends on the step): ``Objective.margin_at`` computes
what the spec's schedule gives; the learner passes the result as ``margin=``.

Defaults are read from the functions' keyword-only signatures, so the registry cannot drift
from the code; ``Objective.with_options`` returns a copy with other defaults (unknown names
raise ``TypeError``, a renamed one says its new name).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from conspo.objectives.ablations import (
    CONSPO_FIXEDMARGIN,
    CONSPO_LINEAR,
    CONSPO_NOMARGIN,
    CONSPO_RATIO,
)
from conspo.objectives.cispo import CISPO
from conspo.objectives.common import as_bool_mask, binary_group_stats, group_index
from conspo.objectives.conspo import CONSPO, margin_schedule
from conspo.objectives.disco import DISCO
from conspo.objectives.grpo import DAPO, DR_GRPO, GRPO
from conspo.objectives.sapo import SAPO
from conspo.objectives.sequence import GMPO, GSPO
from conspo.objectives.spec import ObjectiveFn, ObjectiveSpec

__all__ = [
    "OBJECTIVES",
    "RENAMED_OPTIONS",
    "Objective",
    "ObjectiveSpec",
    "UnknownObjectiveError",
    "get_objective",
    "register",
]

_DATA_KEYWORDS = frozenset({"old_logprobs", "ref_logprobs"})
#: Hyper-parameters that were renamed: an old name gets an error that names the new one.
#: ConSPO's and DisCO's ``kl_beta`` / ``kl_delta`` were the behaviour-KL constraint, easily
#: taken for the learner's ``kl_beta`` setting (the KL to the reference model).
RENAMED_OPTIONS: Mapping[str, str] = MappingProxyType(
    {"kl_beta": "kl_constraint_beta", "kl_delta": "kl_constraint_delta"}
)
_RENAMED_WHY = (
    "the behaviour-KL constraint; the learner setting kl_beta is the KL to the reference model"
)


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


def _keywords(fn: ObjectiveFn) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _hyper_parameters(fn: ObjectiveFn) -> dict[str, Any]:
    params = inspect.signature(fn).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _DATA_KEYWORDS
    }


@dataclass(frozen=True)
class Objective:
    """A registered objective: ``fn(token_logprobs, mask, rewards, group_ids, **kw)``, what it
    needs (``spec``) and its current defaults."""

    name: str
    spec: ObjectiveSpec = field(repr=False)
    defaults: Mapping[str, Any] = field(compare=False)

    @property
    def fn(self) -> ObjectiveFn:
        return self.spec.fn

    @property
    def denominator_kind(self) -> str:
        return self.spec.denominator

    @property
    def margin_schedule(self) -> str | None:
        """``"cosine"``, ``"constant"`` or None (no ``margin`` keyword)."""
        return self.spec.margin_schedule

    @property
    def needs_old_logprobs(self) -> bool:
        """Whether the behaviour log-probs go in as ``old_logprobs`` under these defaults."""
        return self.spec.needs_behaviour_logprobs(self.defaults)

    @property
    def needs_ref_logprobs(self) -> bool:
        """Whether the objective's own reference KL is on (it then takes ``ref_logprobs``)."""
        return self.spec.needs_reference_logprobs(self.defaults)

    def __call__(
        self, token_logprobs: Tensor, mask: Tensor, rewards: Tensor, group_ids: Tensor, **kwargs
    ) -> tuple[Tensor, dict[str, Any]]:
        """Call ``fn`` with the registered defaults overridden by ``kwargs``."""
        return self.fn(token_logprobs, mask, rewards, group_ids, **{**self.defaults, **kwargs})

    def _options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            renamed = [
                f"{old!r} is now {RENAMED_OPTIONS[old]!r}"
                for old in unknown
                if RENAMED_OPTIONS.get(old) in self.defaults
            ]
            hint = f" ({'; '.join(renamed)}: {_RENAMED_WHY})" if renamed else ""
            raise TypeError(
                f"{self.name}: unknown hyper-parameter(s) {unknown}{hint}; "
                f"valid: {sorted(self.defaults)}"
            )
        return {**self.defaults, **options}

    def denominator(self, mask: Tensor, rewards: Tensor, group_ids: Tensor, **options) -> float:
        """What the mean loss of this batch divides by (1.0 for ``reduce="sum"``)."""
        merged = self._options(options)
        reduce = str(merged.get("reduce", "mean"))
        return _denominator(self.denominator_kind, mask, rewards, group_ids, reduce)

    def with_options(self, **options) -> Objective:
        """Copy with other defaults (unknown names raise ``TypeError``)."""
        return Objective(self.name, self.spec, MappingProxyType(self._options(options)))

    def margin_at(self, step: int, total_steps: int, target: float, warmup_ratio: float) -> float:
        """The margin for optimizer step ``step`` of ``total_steps`` (0 without a margin)."""
        if self.margin_schedule == "cosine":
            return margin_schedule(step, total_steps, target, warmup_ratio)
        if self.margin_schedule == "constant":
            return float(target)
        return 0.0


def _check(name: str, spec: ObjectiveSpec) -> None:
    """The spec may only promise what the function takes (ValueError otherwise)."""
    keywords = _keywords(spec.fn)
    hyper = keywords - _DATA_KEYWORDS

    def fail(why: str) -> None:
        raise ValueError(f"objective {name!r}: its spec does not fit {spec.fn.__name__}: {why}")

    if (spec.margin_schedule is not None) != ("margin" in hyper):
        fail(f"margin schedule {spec.margin_schedule!r} but margin keyword: {'margin' in hyper}")
    if spec.behaviour_logprobs is not False and "old_logprobs" not in keywords:
        fail("needs behaviour log-probs but takes no old_logprobs")
    if isinstance(spec.behaviour_logprobs, str) and spec.behaviour_logprobs not in hyper:
        fail(f"behaviour log-probs switched by {spec.behaviour_logprobs!r}, not a hyper-parameter")
    if (spec.reference_kl is not None) != ("ref_logprobs" in keywords):
        takes = "ref_logprobs" in keywords
        fail(f"reference_kl={spec.reference_kl!r} but takes ref_logprobs: {takes}")
    for role in ("reference_kl", "temperature", "generation_budget"):
        param = getattr(spec, role)
        if param is not None and param not in hyper:
            fail(f"{role}={param!r} is not one of its hyper-parameters {sorted(hyper)}")


def register(name: str, spec: ObjectiveSpec) -> Objective:
    """An ``Objective`` for ``spec``; refuses a bare function or a spec its function belies."""
    if not isinstance(spec, ObjectiveSpec):
        raise TypeError(
            f"objective {name!r}: register an ObjectiveSpec (what it needs from the learner), "
            f"not {type(spec).__name__}"
        )
    _check(name, spec)
    return Objective(name, spec, MappingProxyType(_hyper_parameters(spec.fn)))


_SPECS: tuple[tuple[str, ObjectiveSpec], ...] = (
    ("conspo", CONSPO),
    ("conspo_linear", CONSPO_LINEAR),
    ("conspo_ratio", CONSPO_RATIO),
    ("conspo_nomargin", CONSPO_NOMARGIN),
    ("conspo_fixedmargin", CONSPO_FIXEDMARGIN),
    ("grpo", GRPO),
    ("dr_grpo", DR_GRPO),
    ("dapo", DAPO),
    ("disco", DISCO),
    ("gspo", GSPO),
    ("gmpo", GMPO),
    ("cispo", CISPO),
    ("sapo", SAPO),
)

#: Read-only ``name -> Objective`` mapping of every registered objective.
OBJECTIVES: Mapping[str, Objective] = MappingProxyType(
    {name: register(name, spec) for name, spec in _SPECS}
)


def get_objective(name: str) -> Objective:
    """Look up an objective by name; unknown names raise :class:`UnknownObjectiveError`."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        valid = ", ".join(OBJECTIVES)
        raise UnknownObjectiveError(f"unknown objective {name!r}; valid: {valid}") from None
