"""Tiny model construction and the save / from_pretrained route every role uses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conspo.models.tiny import (
    TinyModelConfig,
    build_tiny_model,
    count_parameters,
    load_policy,
    save_model,
)


def test_default_size_and_config():
    model, tok = build_tiny_model()
    n = count_parameters(model)
    assert 300_000 <= n <= 2_000_000
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training


def test_initialisation_depends_only_on_seed():
    a, _ = build_tiny_model(seed=3)
    state = torch.get_rng_state()
    b, _ = build_tiny_model(seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    c, _ = build_tiny_model(seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_save_load_round_trip(tmp_path, arch):
    cfg = TinyModelConfig(arch=arch, hidden_size=64, intermediate_size=128)
    model, tok = build_tiny_model(cfg, seed=0)
    save_model(model, tok, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "config.json").is_file()
    loaded, ltok = load_policy(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.model_type == arch
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    ids = torch.tensor([tok("12+34=46").input_ids])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert ltok("12+34=").input_ids == tok("12+34=").input_ids
    assert ltok.padding_side == "left"
    # the plain transformers route works too (what a real-model user would call)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert count_parameters(plain) == count_parameters(model)


def test_load_policy_dtype(tmp_path):
    model, tok = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64))
    save_model(model, tok, tmp_path)
    loaded, _ = load_policy(tmp_path, dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
