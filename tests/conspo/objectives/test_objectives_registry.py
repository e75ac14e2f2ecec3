"""Registry contract, micro-batch decomposition for every objective, and numerical robustness."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import conspo.objectives as objectives
from conspo.objectives import OBJECTIVES, Objective, UnknownObjectiveError, get_objective

F64 = torch.float64
ABLATIONS = {"conspo_linear", "conspo_ratio", "conspo_nomargin", "conspo_fixedmargin"}
NAMES = {"conspo", "grpo", "dr_grpo", "dapo", "disco", "gspo", "gmpo", "cispo", "sapo", *ABLATIONS}

#: (name, option overrides) pairs exercised by the decomposition / robustness tests.
VARIANTS = [
    ("conspo", {}),
    ("conspo", {"margin": 0.01, "reduce": "all_groups"}),
    ("conspo", {"kl_constraint": True}),
    ("conspo_linear", {}),
    ("conspo_linear", {"margin": 0.01, "reduce": "all_groups"}),
    ("conspo_ratio", {}),
    ("conspo_ratio", {"margin": 0.01, "eps": 0.1}),
    ("conspo_nomargin", {}),
    ("conspo_fixedmargin", {"margin": 0.01}),
    ("grpo", {}),
    ("grpo", {"beta": 0.04, "std": "sample"}),
    ("dr_grpo", {}),
    ("dr_grpo", {"max_len": 16, "beta": 0.04}),
    ("dapo", {}),
    ("dapo", {"max_len": 9, "overlong_buffer": 4}),
    ("disco", {}),
    ("disco", {"reduce": "mean"}),
    ("gspo", {}),
    ("gmpo", {"beta": 0.04}),
    ("cispo", {}),
    ("cispo", {"eps_low": 0.2, "eps_high": 0.28}),
    ("sapo", {}),
]


def make_batch(seed, group_sizes, width, *, dtype=F64, spread=0.3, low=-3.0):
    gen = torch.Generator().manual_seed(seed)
    B = sum(group_sizes)
    ids = torch.randperm(500, generator=gen)[: len(group_sizes)] * 7 - 1000
    gids = torch.repeat_interleave(ids, torch.tensor(group_sizes))
    gids = gids[torch.randperm(B, generator=gen)]
    lengths = torch.randint(0, width + 1, (B,), generator=gen)
    lengths[0] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    rewards = (torch.rand(B, generator=gen) > 0.5).to(dtype)
    lp = (low * torch.rand(B, width, generator=gen, dtype=F64)).to(dtype)
    old = (lp + spread * torch.randn(B, width, generator=gen, dtype=lp.dtype)).detach()
    ref = (lp + spread * torch.randn(B, width, generator=gen, dtype=lp.dtype)).detach()
    return lp.requires_grad_(), mask, rewards, gids, old, ref


def data_kwargs(obj: Objective, old, ref, idx=None):
    pick = (lambda x: x) if idx is None else (lambda x: x[idx])
    kw = {}
    if "kl_constraint" in obj.defaults or obj.needs_old_logprobs:
        kw["old_logprobs"] = pick(old)
    if obj.needs_ref_logprobs:
        kw["ref_logprobs"] = pick(ref)
    return kw


def test_registered_names_and_exports():
    assert set(OBJECTIVES) == NAMES
    for name in NAMES:
        obj = get_objective(name)
        assert isinstance(obj, Objective)
        assert obj.name == name
        assert callable(obj.fn)
    for export in [
        "sequence_scores",
        "conspo_loss",
        "conspo_coefficients",
        "conspo_linear",
        "conspo_ratio",
        "conspo_nomargin",
        "margin_schedule",
        "grpo",
        "dr_grpo",
        "dapo",
        "disco",
        "gspo",
        "gmpo",
        "cispo",
        "sapo",
        "get_objective",
        "OBJECTIVES",
        "Objective",
    ]:
        assert hasattr(objectives, export), export


def test_unknown_name_raises_typed_key_error_listing_names():
    with pytest.raises(UnknownObjectiveError) as info:
        get_objective("ppo")
    assert isinstance(info.value, KeyError)
    for name in NAMES:
        assert name in str(info.value)


def test_objective_is_frozen_and_defaults_read_only():
    obj = get_objective("grpo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        obj.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        obj.defaults["eps"] = 0.3  # type: ignore[index]


def test_paper_defaults():
    d = {name: dict(OBJECTIVES[name].defaults) for name in NAMES}
    assert d["conspo"]["tau"] == 10.0
    assert d["conspo"]["reduce"] == "mean"
    assert d["conspo"]["kl_constraint"] is False
    assert (d["conspo"]["kl_constraint_delta"], d["conspo"]["kl_constraint_beta"]) == (1e-4, 1e3)
    assert (d["grpo"]["eps"], d["grpo"]["beta"], d["grpo"]["std"]) == (0.2, 0.0, "population")
    assert d["dr_grpo"]["eps"] == 0.2
    assert (d["dapo"]["eps_low"], d["dapo"]["eps_high"], d["dapo"]["beta"]) == (0.2, 0.28, 0.0)
    disco = d["disco"]
    assert (disco["tau"], disco["kl_constraint_delta"], disco["kl_constraint_beta"]) == (
        10.0,
        1e-4,
        1e3,
    )
    assert d["disco"]["reduce"] == "all_groups"
    assert (d["gspo"]["eps_low"], d["gspo"]["eps_high"]) == (3e-4, 4e-4)
    assert (d["gmpo"]["eps_low"], d["gmpo"]["eps_high"]) == (0.4, 0.4)
    assert (d["cispo"]["eps_low"], d["cispo"]["eps_high"]) == (None, 3.0)
    assert (d["sapo"]["tau_pos"], d["sapo"]["tau_neg"]) == (1.0, 1.05)


def test_requirement_flags_follow_options():
    assert not get_objective("conspo").needs_old_logprobs
    assert get_objective("conspo").with_options(kl_constraint=True).needs_old_logprobs
    assert get_objective("disco").needs_old_logprobs
    assert not get_objective("grpo").needs_ref_logprobs
    assert get_objective("grpo").with_options(beta=0.04).needs_ref_logprobs
    assert not get_objective("conspo_nomargin").needs_old_logprobs
    assert not get_objective("conspo_fixedmargin").needs_old_logprobs
    assert not get_objective("conspo_linear").needs_old_logprobs
    for name in NAMES - {"conspo", "disco", "conspo_linear", "conspo_nomargin"}:
        if name != "conspo_fixedmargin":
            assert get_objective(name).needs_old_logprobs, name


@pytest.mark.parametrize("name", sorted(NAMES))
def test_unknown_keywords_raise_type_error(name):
    lp, mask, rewards, gids, _, _ = make_batch(0, [3, 3], 4)
    obj = get_objective(name)
    with pytest.raises(TypeError):
        obj(lp, mask, rewards, gids, not_a_hyper_parameter=1.0)
    with pytest.raises(TypeError):
        obj.fn(lp, mask, rewards, gids, not_a_hyper_parameter=1.0)
    with pytest.raises(TypeError):
        obj.denominator(mask, rewards, gids, not_a_hyper_parameter=1.0)
    with pytest.raises(TypeError):
        obj.with_options(not_a_hyper_parameter=1.0)


@pytest.mark.parametrize(("name", "options"), VARIANTS)
@pytest.mark.parametrize("seed", range(2))
def test_micro_batches_of_whole_groups_sum_to_full_batch_mean(name, options, seed):
    """sum_k loss_sum(micro-batch k) / denominator(full batch) == mean loss of the full batch."""
    obj = get_objective(name).with_options(**options)
    lp, mask, rewards, gids, old, ref = make_batch(seed, [8, 8, 5, 3, 1, 8, 6], 12)
    rewards[gids == gids[1]] = 1.0  # make sure an all-positive group is present
    full, diag = obj(lp, mask, rewards, gids, **data_kwargs(obj, old, ref))
    (full_grad,) = torch.autograd.grad(full, lp)
    denominator = obj.denominator(mask, rewards, gids)
    assert float(diag["denominator"]) == pytest.approx(denominator)

    uniq = gids.unique()
    gen = torch.Generator().manual_seed(seed)
    part_of = torch.randint(0, 3, (len(uniq),), generator=gen)
    part_of[:3] = torch.tensor([0, 1, 2])
    total = torch.zeros((), dtype=lp.dtype)
    for k in range(3):
        idx = torch.isin(gids, uniq[part_of == k]).nonzero().flatten()
        part, _ = obj(
            lp[idx],
            mask[idx],
            rewards[idx],
            gids[idx],
            reduce="sum",
            **data_kwargs(obj, old, ref, idx),
        )
        total = total + part / denominator
    (split_grad,) = torch.autograd.grad(total, lp)
    assert total.item() == pytest.approx(full.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("name", "options"), VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_inputs_stay_finite(name, options, dtype):
    """Log-probs down to -1e4, wildly off-policy old/ref, empty completions, G = 1, garbage pad."""
    obj = get_objective(name).with_options(**options)
    lp, mask, rewards, gids, _, _ = make_batch(3, [8, 1, 4, 1, 2], 10, dtype=dtype, low=-1e4)
    gen = torch.Generator().manual_seed(9)
    old = (-1e4 * torch.rand(lp.shape, generator=gen, dtype=F64)).to(dtype)
    ref = (-1e4 * torch.rand(lp.shape, generator=gen, dtype=F64)).to(dtype)
    mask[3] = False  # an empty completion
    mask[5] = False
    with torch.no_grad():
        lp[~mask] = -math.inf  # garbage in padding must not leak
    old = old.masked_fill(~mask, math.nan)
    ref = ref.masked_fill(~mask, math.inf)
    loss, diag = obj(lp, mask, rewards, gids, **data_kwargs(obj, old, ref))
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss)
    assert bool(torch.isfinite(grad).all())
    assert bool((grad[~mask] == 0).all())
    for key, value in diag.items():
        assert math.isfinite(float(value)), key


def test_extreme_inputs_accept_only_relevant_data_keywords():
    lp, mask, rewards, gids, _, ref = make_batch(1, [4], 3)
    with pytest.raises(TypeError):
        get_objective("conspo")(lp, mask, rewards, gids, ref_logprobs=ref)
    with pytest.raises(ValueError, match="ref_logprobs"):
        get_objective("grpo")(lp, mask, rewards, gids, beta=0.1)


@pytest.mark.parametrize("name", sorted(NAMES))
def test_single_completion_groups_and_empty_batch_behave(name):
    obj = get_objective(name)
    lp, mask, rewards, gids, old, ref = make_batch(2, [1, 1, 1], 5)
    loss, diag = obj(lp, mask, rewards, gids, **data_kwargs(obj, old, ref))
    (grad,) = torch.autograd.grad(loss, lp)
    assert float(diag["valid_groups"]) == 0.0
    if name not in {"cispo"}:  # every group is its own baseline: no learning signal at G = 1
        assert bool((grad == 0).all()), name
    assert bool(torch.isfinite(grad).all())


@pytest.mark.parametrize("name", sorted(NAMES))
def test_diagnostics_are_detached_scalars(name):
    obj = get_objective(name)
    lp, mask, rewards, gids, old, ref = make_batch(5, [4, 4], 6)
    _, diag = obj(lp, mask, rewards, gids, **data_kwargs(obj, old, ref))
    assert {"valid_groups", "skipped_groups", "score_gap", "denominator"} <= set(diag)
    if name not in {"conspo", "disco", "conspo_linear", "conspo_nomargin", "conspo_fixedmargin"}:
        assert {"clip_frac_low", "clip_frac_high"} <= set(diag)
    if name in {"conspo", "conspo_ratio", "conspo_nomargin", "conspo_fixedmargin"}:
        assert "mean_p_pos" in diag
    for key, value in diag.items():
        if isinstance(value, torch.Tensor):
            assert value.dim() == 0, key
            assert not value.requires_grad, key
        else:
            assert isinstance(value, float), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "options"), VARIANTS)
def test_cuda_matches_cpu(name, options):
    obj = get_objective(name).with_options(**options)
    lp, mask, rewards, gids, old, ref = make_batch(4, [8, 8, 3, 1], 9)
    cpu_loss, _ = obj(lp, mask, rewards, gids, **data_kwargs(obj, old, ref))
    (cpu_grad,) = torch.autograd.grad(cpu_loss, lp)
    dev = torch.device("cuda")
    lp_d = lp.detach().to(dev).requires_grad_()
    kw = {k: v.to(dev) for k, v in data_kwargs(obj, old, ref).items()}
    loss, _ = obj(lp_d, mask.to(dev), rewards.to(dev), gids.to(dev), **kw)
    (grad,) = torch.autograd.grad(loss, lp_d)
    assert loss.item() == pytest.approx(cpu_loss.item(), rel=1e-9, abs=1e-12)
    torch.testing.assert_close(grad.cpu(), cpu_grad, rtol=1e-9, atol=1e-12)
