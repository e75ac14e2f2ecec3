"""Verified, pure-PyTorch RLVR objectives: ConSPO and the baselines of its paper.

Every objective takes ``(token_logprobs [B,T], mask [B,T], rewards [B], group_ids [B])`` plus
keyword hyper-parameters and returns ``(scalar loss, diagnostics)``; diagnostics are detached
floats / 0-dim tensors, including ``denominator`` (what the mean divides by) so the learner can
micro-batch by whole groups with ``reduce="sum"``. See ``docs`` of each module for the paper
defaults chosen, ``spec`` for what each declares it needs from the learner, and ``registry`` for
the name -> objective table.
"""

from conspo.objectives.ablations import conspo_linear, conspo_nomargin, conspo_ratio
from conspo.objectives.cispo import cispo
from conspo.objectives.common import (
    LOG_RATIO_CLAMP,
    POSITIVE_THRESHOLD,
    count_valid_groups,
    k3_kl,
    sequence_scores,
)
from conspo.objectives.conspo import (
    DEFAULT_MARGIN,
    DEFAULT_MARGIN_WARMUP_RATIO,
    DEFAULT_TAU,
    conspo_coefficients,
    conspo_loss,
    conspo_surrogate_loss,
    margin_schedule,
)
from conspo.objectives.disco import disco
from conspo.objectives.grpo import (
    dapo,
    dapo_dynamic_sampling_mask,
    dapo_overlong_penalty,
    dr_grpo,
    grpo,
)
from conspo.objectives.registry import (
    OBJECTIVES,
    Objective,
    UnknownObjectiveError,
    get_objective,
)
from conspo.objectives.sapo import sapo
from conspo.objectives.sequence import gmpo, gspo
from conspo.objectives.spec import ObjectiveSpec

__all__ = [
    "DEFAULT_MARGIN",
    "DEFAULT_MARGIN_WARMUP_RATIO",
    "DEFAULT_TAU",
    "LOG_RATIO_CLAMP",
    "OBJECTIVES",
    "POSITIVE_THRESHOLD",
    "Objective",
    "ObjectiveSpec",
    "UnknownObjectiveError",
    "cispo",
    "conspo_coefficients",
    "conspo_linear",
    "conspo_loss",
    "conspo_nomargin",
    "conspo_ratio",
    "conspo_surrogate_loss",
    "count_valid_groups",
    "dapo",
    "dapo_dynamic_sampling_mask",
    "dapo_overlong_penalty",
    "disco",
    "dr_grpo",
    "get_objective",
    "gmpo",
    "grpo",
    "gspo",
    "k3_kl",
    "margin_schedule",
    "sapo",
    "sequence_scores",
]
