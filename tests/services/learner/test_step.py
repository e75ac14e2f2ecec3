"""The learner's update, in-process on the tiny model: direction, exact accumulation, schedules."""

from __future__ import annotations

import math

import pytest

from conspo.models.tiny import load_policy
from conspo.objectives import OBJECTIVES, ObjectiveSpec, grpo, registry
from services.learner.data import TrainGroup, assign_to_ranks, plan_micro_batches
from services.learner.distributed import DistContext
from services.learner.step import ObjectivePlan, TrainConfig, Trainer, lr_factor


def _trainer(model_path, *, with_ref: bool = False, **config) -> Trainer:
    model, tokenizer = load_policy(model_path)
    ref = load_policy(model_path)[0].requires_grad_(False) if with_ref else None
    return Trainer(
        TrainConfig(**config),
        model,
        DistContext(),
        ref_model=ref,
        pad_id=tokenizer.pad_token_id,
        dummy_ids=(tokenizer.bos_token_id, tokenizer.eos_token_id),
    )


def _split(scores: list[list[float]], groups: list[TrainGroup]) -> tuple[float, float]:
    """Mean score of the positives and of the negatives of all groups."""
    pos, neg = [], []
    for g, row in zip(groups, scores, strict=True):
        for s, r in zip(row, g.rewards, strict=True):
            (pos if r else neg).append(s)
    return sum(pos) / len(pos), sum(neg) / len(neg)


def test_conspo_step_raises_positive_scores_and_lowers_negative_ones(model_path, groups_factory):
    # Mixed groups (1 to 3 positives of 4), so positives and negatives both carry weight in J.
    labeled = groups_factory(8, group_size=4, pattern=lambda i: [j <= i % 3 for j in range(4)])
    groups = [TrainGroup.from_labeled(g) for g in labeled]
    # A small step (first-order regime) without clipping: what moves is the objective's doing.
    trainer = _trainer(model_path, lr=3e-5, margin=0.0, grad_clip=1e9)
    before = trainer.sequence_scores(groups)
    stats = trainer.step(groups, 0, 100)
    after = trainer.sequence_scores(groups)
    loss_after = trainer.accumulate(groups, 1, 100).loss

    pos0, neg0 = _split(before, groups)
    pos1, neg1 = _split(after, groups)
    assert pos1 > pos0, (pos0, pos1)
    assert neg1 < neg0, (neg0, neg1)
    assert loss_after < stats.loss
    # AdamW's first step is a per-parameter sign step: it increases J to first order, but does
    # not promise every group's gap on its own; most groups must still separate further.
    gaps_before = [_group_gap(g, s) for g, s in zip(groups, before, strict=True)]
    gaps_after = [_group_gap(g, s) for g, s in zip(groups, after, strict=True)]
    assert sum(a > b for b, a in zip(gaps_before, gaps_after, strict=True)) >= 6
    # At tau = 10 the scores are close relative to tau, so each positive's P_i is near
    # 1/(1 + N-) (../shared/design/conspo.md, ConSPO item 7).
    assert stats.diagnostics["mean_p_pos"] == pytest.approx(
        stats.diagnostics["mean_p_pos_uniform"], rel=0.1
    )
    assert stats.diagnostics["valid_groups"] == 8
    assert stats.diagnostics["score_gap"] == pytest.approx(
        sum(gaps_before) / len(gaps_before), rel=1e-4
    )
    assert 0 < stats.grad_norm < math.inf


def _group_gap(group: TrainGroup, scores: list[float]) -> float:
    pos = [s for s, r in zip(scores, group.rewards, strict=True) if r]
    neg = [s for s, r in zip(scores, group.rewards, strict=True) if not r]
    return sum(pos) / len(pos) - sum(neg) / len(neg)


@pytest.mark.parametrize(
    ("objective", "extra"),
    [
        ("conspo", {"margin": 0.01}),
        ("grpo", {}),
        ("dapo", {}),
        ("conspo", {"kl_beta": 0.1}),
        # ConSPO's ablations, selected by name like any objective (ratio scores need the
        # behaviour log-probs, the fixed margin is applied from step 0).
        ("conspo_ratio", {"margin": 0.01}),
        ("conspo_linear", {}),
        ("conspo_fixedmargin", {"margin": 0.01}),
        ("conspo_nomargin", {}),
    ],
)
def test_micro_batches_accumulate_the_full_batch_gradient(
    model_path, groups_factory, objective, extra
):
    labeled = groups_factory(
        6, group_size=4, pattern=lambda i: [j <= i % 3 for j in range(4)], seed=3
    )
    groups = [TrainGroup.from_labeled(g) for g in labeled]
    with_ref = extra.get("kl_beta", 0) > 0
    grads = []
    for budget in (1_000_000, 1):  # one micro-batch / one group per micro-batch
        trainer = _trainer(
            model_path, objective=objective, token_budget=budget, with_ref=with_ref, **extra
        )
        stats = trainer.accumulate(groups, 10, 100)
        assert stats.micro_batches == (1 if budget > 1 else len(groups))
        grads.append(({n: p.grad.clone() for n, p in trainer.model.named_parameters()}, stats))
    (whole, s_whole), (parts, s_parts) = grads
    assert s_parts.loss == pytest.approx(s_whole.loss, rel=1e-5, abs=1e-7)
    for name, g in whole.items():
        # Same sum in another order: float32 round-off only (~4e-7 relative on one thread, up to
        # ~1e-5 with multi-threaded reductions). A wrong weight or a dropped micro-batch is off
        # by >= 1/6 here, so 1e-4 still catches every real accumulation bug.
        assert float((parts[name] - g).norm()) <= 1e-4 * float(g.norm()) + 1e-12, name
    assert any(g.abs().sum() > 0 for g in whole.values())


def test_each_objective_gets_its_own_margin_schedule(model_path):
    def margins(objective: str) -> list[float]:
        trainer = _trainer(model_path, objective=objective, margin=0.02, margin_warmup=0.5)
        return [trainer.margin_at(step, 10) for step in (0, 5, 9)]

    assert margins("conspo") == pytest.approx([0.0, 0.02, 0.02])  # cosine ramp over 5 steps
    assert margins("conspo_linear") == pytest.approx([0.0, 0.02, 0.02])
    assert margins("conspo_fixedmargin") == pytest.approx([0.02, 0.02, 0.02])
    assert margins("conspo_nomargin") == [0.0, 0.0, 0.0]
    assert margins("grpo") == [0.0, 0.0, 0.0]


class Probe:
    """An objective with none of the usual keyword names, registered under a new name: the
    learner can only serve it by reading its spec. Records what each call received."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(
        self,
        token_logprobs,
        mask,
        rewards,
        group_ids,
        *,
        old_logprobs=None,
        ref_logprobs=None,
        temp: float = 1.0,
        ref_coef: float = 0.0,
        length: int | None = None,
        gap: float = 0.0,
        reduce: str = "mean",
    ):
        self.calls.append(
            {
                "old": old_logprobs is not None,
                "ref": ref_logprobs is not None,
                "temp": temp,
                "ref_coef": ref_coef,
                "length": length,
                "gap": gap,
            }
        )
        return grpo(
            token_logprobs, mask, rewards, group_ids, old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs, beta=ref_coef, reduce=reduce,
        )  # fmt: skip


@pytest.fixture
def probe(monkeypatch) -> Probe:
    fn = Probe()
    fn.__name__ = "probe"  # type: ignore[attr-defined]
    spec = ObjectiveSpec(
        fn,
        denominator="sequences",
        reference_kl="ref_coef",
        temperature="temp",
        generation_budget="length",
    )
    monkeypatch.setattr(
        registry, "OBJECTIVES", {**OBJECTIVES, "probe": registry.register("probe", spec)}
    )
    return fn


def test_the_step_serves_what_the_spec_declares(model_path, groups_factory, probe):
    groups = [TrainGroup.from_labeled(g) for g in groups_factory(2, group_size=4, seed=5)]
    trainer = _trainer(model_path, objective="probe", tau=3.0, kl_beta=0.25, with_ref=True)
    trainer.accumulate(groups, 0, 10)
    budget = max(g.max_tokens for g in groups)
    assert probe.calls == [
        {"old": True, "ref": True, "temp": 3.0, "ref_coef": 0.25, "length": budget, "gap": 0.0}
    ]
    # The objective applies the reference KL itself: the learner adds none on top.
    assert trainer.plan.learner_kl_beta == 0.0


def test_the_users_values_win_over_what_the_learner_fills(probe):
    config = TrainConfig(
        objective="probe", tau=3.0, kl_beta=0.25, objective_params={"temp": 7.0, "length": 9}
    )
    plan = ObjectivePlan.of(config)
    assert (plan.objective.defaults["temp"], plan.objective.defaults["ref_coef"]) == (7.0, 0.25)
    assert plan.batch_options([]) == {} and plan.needs_reference


@pytest.mark.parametrize(
    ("objective", "kl_beta", "learner_kl", "reference", "behaviour"),
    [
        ("conspo", 0.0, 0.0, False, False),
        ("conspo", 0.1, 0.1, True, False),  # no reference KL of its own: the learner adds it
        ("disco", 0.1, 0.1, True, True),
        ("grpo", 0.0, 0.0, False, True),
        ("grpo", 0.1, 0.0, True, True),  # its own beta takes the setting
        ("conspo_linear", 0.0, 0.0, False, False),
    ],
)
def test_the_plan_reads_each_spec(objective, kl_beta, learner_kl, reference, behaviour):
    plan = ObjectivePlan.of(TrainConfig(objective=objective, kl_beta=kl_beta, tau=4.0))
    assert plan.learner_kl_beta == learner_kl
    assert plan.needs_reference is reference
    assert plan.needs_behaviour is behaviour
    if plan.objective.spec.temperature is not None:
        assert plan.objective.defaults[plan.objective.spec.temperature] == 4.0


def test_a_reference_kl_without_a_reference_model_is_refused(model_path):
    with pytest.raises(ValueError, match="reference model"):
        _trainer(model_path, objective="conspo", kl_beta=0.1)


def test_lr_schedules_follow_their_definitions():
    f = lambda s, sched: lr_factor(s, warmup=4, total=20, schedule=sched)  # noqa: E731
    assert [f(s, "constant") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(10, "constant") == 1.0
    assert f(4, "cosine") == pytest.approx(1.0)
    assert f(12, "cosine") == pytest.approx(0.5)  # half-way through the decay: cos(pi/2)
    assert f(20, "cosine") == pytest.approx(0.0)
    assert f(12, "linear") == pytest.approx(0.5)
    assert f(30, "linear") == 0.0


def _g(size: int, length: int, gid: str = "x") -> TrainGroup:
    comp = tuple((5,) * length for _ in range(size))
    lps = tuple((0.0,) * length for _ in range(size))
    return TrainGroup(gid, (1, 2), comp, lps, (1.0,) * size, (True,) * size, 1.0, 8, 0)


def test_micro_batches_and_rank_shares_keep_groups_whole():
    groups = [_g(4, 8), _g(4, 2), _g(8, 30), _g(2, 1), _g(4, 8)]
    plan = plan_micro_batches(groups, token_budget=100)
    assert [i for mb in plan for i in mb] == list(range(len(groups)))  # order kept, all used
    for mb in plan:
        rows = sum(groups[i].size for i in mb)
        longest = max(groups[i].longest for i in mb)
        assert rows * longest <= 100 or len(mb) == 1  # an oversized group is alone
    shares = assign_to_ranks(groups, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(groups)))
    loads = [sum(groups[i].padded_tokens for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(g.padded_tokens for g in groups)


def test_activation_checkpointing_gives_the_same_gradient(model_path, groups_factory):
    from services.learner.loop import _enable_activation_checkpointing

    labeled = groups_factory(4, pattern=lambda i: [j <= i % 3 for j in range(4)], seed=4)
    groups = [TrainGroup.from_labeled(g) for g in labeled]
    grads = []
    for checkpointing in (False, True):
        # The same (flat) layout both times: checkpointing turns prompt sharing off.
        trainer = _trainer(model_path, token_budget=40, share_prompts=False)
        if checkpointing:
            _enable_activation_checkpointing(trainer.model)
            # transformers renamed the flag (5.17: is_gradient_checkpointing; 5.24: both)
            m = trainer.model
            if hasattr(m, "is_activation_checkpointing"):
                assert m.is_activation_checkpointing
            else:
                assert m.is_gradient_checkpointing
        trainer.accumulate(groups, 0, 100)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    for name, g in grads[0].items():
        assert float((grads[1][name] - g).norm()) <= 1e-6 * float(g.norm()) + 1e-12, name


def test_prompt_sharing_is_used_and_gives_the_same_gradient(
    model_path, groups_factory, monkeypatch
):
    import services.learner.step as step_module

    seen = []
    real = step_module.completion_logprobs

    def spy(*args, **kwargs):
        seen.append(kwargs.get("share_prompts"))
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "completion_logprobs", spy)
    labeled = groups_factory(4, pattern=lambda i: [j <= i % 3 for j in range(4)], seed=5)
    groups = [TrainGroup.from_labeled(g) for g in labeled]
    grads = []
    for share in (False, True):
        trainer = _trainer(model_path, share_prompts=share)
        trainer.accumulate(groups, 0, 100)
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    assert set(seen) == {False, True}
    for name, g in grads[0].items():
        assert float(g.norm()) > 0, name
        assert float((grads[1][name] - g).norm()) <= 1e-5 * float(g.norm()), name
