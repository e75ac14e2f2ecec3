"""`bf16` (CONSPO_BF16, default true) switches itself off on a CPU: float32 there, bit for bit."""

from __future__ import annotations

import torch

from conspo.models.tiny import load_policy
from services.learner.data import TrainGroup
from services.learner.distributed import DistContext
from services.learner.step import TrainConfig, Trainer


def test_bf16_on_cpu_trains_exactly_like_float32(model_path, groups_factory):
    groups = [TrainGroup.from_labeled(g) for g in groups_factory(4, group_size=4)]
    grads = []
    for bf16 in (True, False):
        model, tokenizer = load_policy(model_path)
        trainer = Trainer(
            TrainConfig(bf16=bf16),
            model,
            DistContext(),
            pad_id=tokenizer.pad_token_id,
            dummy_ids=(tokenizer.bos_token_id, tokenizer.eos_token_id),
        )
        assert trainer.ctx.device.type == "cpu"
        trainer.accumulate(groups, 0, 10)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
