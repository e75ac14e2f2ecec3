"""Each objective's ``ObjectiveSpec``: declared beside it, checked by the registry, read by
``Objective`` (the learner side is in ``tests/services/learner/test_step.py``)."""

from __future__ import annotations

import dataclasses

import pytest

from conspo.objectives import OBJECTIVES, ObjectiveSpec, get_objective, grpo
from conspo.objectives.registry import RENAMED_OPTIONS, register
from conspo.settings import LearnerSettings

#: name -> (denominator, behaviour log-probs, reference_kl, temperature, margin, budget): the
#: contract the learner relies on, written out so a changed spec is a visible decision.
EXPECTED = {
    "conspo": ("valid_groups", "kl_constraint", None, "tau", "cosine", None),
    "conspo_linear": ("valid_groups", False, None, None, "cosine", None),
    "conspo_ratio": ("valid_groups", True, None, "tau", "cosine", None),
    "conspo_nomargin": ("valid_groups", "kl_constraint", None, "tau", None, None),
    "conspo_fixedmargin": ("valid_groups", "kl_constraint", None, "tau", "constant", None),
    "grpo": ("sequences", True, "beta", None, None, None),
    "dr_grpo": ("sequences", True, "beta", None, None, "max_len"),
    "dapo": ("tokens", True, "beta", None, None, None),
    "disco": ("valid_groups", "kl_constraint_beta", None, "tau", None, None),
    "gspo": ("sequences", True, "beta", None, None, None),
    "gmpo": ("sequences", True, "beta", None, None, None),
    "cispo": ("tokens", True, "beta", None, None, None),
    "sapo": ("sequences", True, "beta", None, None, None),
}


def _fields(spec: ObjectiveSpec) -> tuple:
    return (
        spec.denominator,
        spec.behaviour_logprobs,
        spec.reference_kl,
        spec.temperature,
        spec.margin_schedule,
        spec.generation_budget,
    )


def test_every_objective_is_registered_from_its_spec():
    assert set(OBJECTIVES) == set(EXPECTED)
    for name, obj in OBJECTIVES.items():
        assert isinstance(obj.spec, ObjectiveSpec), name
        assert obj.fn is obj.spec.fn
        assert _fields(obj.spec) == EXPECTED[name], name
        assert obj.denominator_kind == obj.spec.denominator
        assert obj.margin_schedule == obj.spec.margin_schedule


def test_requirements_follow_the_spec_and_the_options():
    disco = get_objective("disco")
    assert disco.needs_old_logprobs
    assert not disco.with_options(kl_constraint_beta=0.0).needs_old_logprobs  # no hinge: no KL
    conspo = get_objective("conspo")
    assert not conspo.needs_old_logprobs
    assert conspo.with_options(kl_constraint=True).needs_old_logprobs
    assert not conspo.with_options(kl_constraint=True).needs_ref_logprobs  # behaviour, not ref
    for name in ("grpo", "dr_grpo", "dapo", "gspo", "gmpo", "cispo", "sapo"):
        assert not get_objective(name).needs_ref_logprobs, name
        assert get_objective(name).with_options(beta=0.04).needs_ref_logprobs, name


def test_the_registry_refuses_an_objective_without_a_spec():
    with pytest.raises(TypeError, match="ObjectiveSpec"):
        register("bare", grpo)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"margin_schedule": "cosine"}, "margin"),  # grpo takes no margin
        ({"reference_kl": None}, "ref_logprobs"),  # grpo takes ref_logprobs: someone applies it
        ({"reference_kl": "kl_beta"}, "kl_beta"),  # not one of grpo's hyper-parameters
        ({"temperature": "tau"}, "tau"),
        ({"generation_budget": "max_len"}, "max_len"),
        ({"behaviour_logprobs": "eps_gate"}, "eps_gate"),
    ],
)
def test_the_registry_refuses_a_spec_its_function_belies(change, why):
    spec = dataclasses.replace(get_objective("grpo").spec, **change)
    with pytest.raises(ValueError, match=why):
        register("wrong", spec)


def test_a_spec_needing_behaviour_logprobs_needs_the_keyword():
    def no_old(token_logprobs, mask, rewards, group_ids, *, reduce="mean"):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="old_logprobs"):
        register("no_old", ObjectiveSpec(no_old, denominator="sequences"))
    assert register(
        "no_old", ObjectiveSpec(no_old, denominator="sequences", behaviour_logprobs=False)
    ).defaults == {"reduce": "mean"}


def test_a_spec_names_known_kinds_only():
    with pytest.raises(ValueError, match="denominator"):
        ObjectiveSpec(grpo, denominator="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        ObjectiveSpec(grpo, denominator="sequences", margin_schedule="linear")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["conspo", "conspo_nomargin", "disco"])
def test_the_behaviour_kl_constraint_has_its_own_names(name):
    # ``kl_beta`` is the learner's reference-KL setting; inside these objectives the squared
    # hinge to the behaviour policy is ``kl_constraint_beta`` / ``kl_constraint_delta``.
    defaults = get_objective(name).defaults
    assert {"kl_constraint_beta", "kl_constraint_delta"} <= set(defaults)
    assert not {"kl_beta", "kl_delta"} & set(defaults)
    for old, new in RENAMED_OPTIONS.items():
        with pytest.raises(TypeError, match=f"'{old}' is now '{new}'"):
            get_objective(name).with_options(**{old: 1.0})


def test_an_old_objective_parameter_fails_when_the_settings_load():
    with pytest.raises(ValueError, match="'kl_beta' is now 'kl_constraint_beta'"):
        LearnerSettings(objective="disco", objective_params={"kl_beta": 100.0})
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        LearnerSettings(objective="grpo", objective_params={"kl_constraint_beta": 1.0})
    ok = LearnerSettings(objective="disco", objective_params={"kl_constraint_beta": 100.0})
    assert ok.objective_params == {"kl_constraint_beta": 100.0}
    assert LearnerSettings(kl_beta=0.1).kl_beta == 0.1  # the learner's reference KL stays
