"""Fixtures for the model-layer tests: a small random model with peaked distributions."""

from __future__ import annotations

import pytest
import torch

from conspo.models.tiny import TinyModelConfig, build_tiny_model

SMALL = TinyModelConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)


def make_peaked_model(seed: int = 0, config: TinyModelConfig = SMALL):
    """A random tiny model whose weights are scaled up so that next-token distributions are
    far from uniform (log-probs spread over several nats): comparisons of log-probs then test
    something."""
    model, tok = build_tiny_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (3.0 / p.shape[-1] ** 0.5))
            elif "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    return model, tok


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    OpenMP threads per process were measured 6x slower per forward (7 ms vs 40 ms) than one.
    Scoped to these tests and restored after each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def peaked():
    return make_peaked_model()
