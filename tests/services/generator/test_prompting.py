"""Per-group seeds and token budgets."""

from __future__ import annotations

from conspo.protocol import SamplingParams
from services.generator.prompting import group_params, group_seed


def test_group_seed_is_stable_and_entry_specific():
    a = group_seed(0, "1700000000000-0")
    assert a == group_seed(0, "1700000000000-0")
    assert a != group_seed(0, "1700000000000-1")
    assert a != group_seed(1, "1700000000000-0")
    assert 0 <= a < 2**31


def test_group_params_cut_the_budget_to_the_context():
    base = SamplingParams(n=8, max_tokens=512, temperature=0.9, stop=["\n"])
    p = group_params(base, prompt_len=100, max_model_len=128, seed=5)
    assert (p.max_tokens, p.seed, p.n, p.temperature, p.stop) == (28, 5, 8, 0.9, ["\n"])
    assert group_params(base, prompt_len=10, max_model_len=4096, seed=5).max_tokens == 512
