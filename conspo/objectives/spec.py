"""What an objective needs from the learner, declared once beside the objective.

Each objective module declares an ``ObjectiveSpec`` next to its function (``conspo.CONSPO``,
``grpo.GRPO``, ...); the registry registers specs, never bare functions, and checks each spec
against the function's signature, so a spec cannot promise what the code does not take. The
learner reads the spec (through ``Objective``) instead of guessing from the objective's name or
from which keyword arguments it happens to have:

* ``denominator``: what the full-batch mean divides by, so micro-batches of whole groups
  accumulate the exact full-batch loss (``registry`` module doc): ``valid_groups``,
  ``groups``, ``sequences`` or ``tokens``;
* ``behaviour_logprobs``: whether the learner must pass the generator's recorded log-probs as
  ``old_logprobs``: always, never, or only while a named hyper-parameter is on / non-zero
  (ConSPO's ``kl_constraint``, DisCO's ``kl_constraint_beta``);
* ``reference_kl``: the hyper-parameter through which the objective applies a KL to the frozen
  reference model itself (it then takes ``ref_logprobs``); the learner's ``kl_beta`` setting
  fills it. ``None``: the objective has no such term and the learner adds
  ``kl_beta * k3`` on top when ``kl_beta > 0``;
* ``temperature``: the hyper-parameter the learner's ``tau`` setting fills, if any;
* ``margin_schedule``: the curriculum margin the learner passes as ``margin`` (``cosine``:
  ConSPO's ramp, ``constant``: the target from step 0, ``None``: no margin);
* ``generation_budget``: a hyper-parameter that, left ``None``, the learner fills with the
  batch's generation budget (``max_tokens``), so every micro-batch divides by the same constant
  (Dr.GRPO's ``max_len``).

A user's ``objective_params`` still override what the learner fills in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import Tensor

__all__ = ["DenominatorKind", "MarginSchedule", "ObjectiveFn", "ObjectiveSpec"]

ObjectiveFn = Callable[..., tuple[Tensor, dict[str, Any]]]
DenominatorKind = Literal["valid_groups", "groups", "sequences", "tokens"]
MarginSchedule = Literal["cosine", "constant"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """An objective function and what it needs (see the module doc for each field)."""

    fn: ObjectiveFn
    denominator: DenominatorKind
    behaviour_logprobs: bool | str = True
    reference_kl: str | None = None
    temperature: str | None = None
    margin_schedule: MarginSchedule | None = None
    generation_budget: str | None = None

    def __post_init__(self) -> None:
        if self.denominator not in get_args(DenominatorKind):
            raise ValueError(f"unknown denominator kind {self.denominator!r}")
        if self.margin_schedule not in (*get_args(MarginSchedule), None):
            raise ValueError(f"unknown margin schedule {self.margin_schedule!r}")

    def needs_behaviour_logprobs(self, params: Mapping[str, Any]) -> bool:
        """Whether ``old_logprobs`` must be passed under the hyper-parameters ``params``."""
        if isinstance(self.behaviour_logprobs, bool):
            return self.behaviour_logprobs
        return bool(params[self.behaviour_logprobs])

    def needs_reference_logprobs(self, params: Mapping[str, Any]) -> bool:
        """Whether ``ref_logprobs`` must be passed (the objective's own reference KL is on)."""
        return self.reference_kl is not None and params[self.reference_kl] != 0.0
