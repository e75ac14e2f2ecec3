"""Tiny causal LMs for the embedded demo, and the one loader every role uses.

Why a Qwen2-architecture model: the production target is Qwen2.5-Math, so the demo exercises the
same `transformers` modelling code, parameter names (weight sync by name) and RoPE position
handling as the real model; only the sizes differ. `arch="llama"` is offered for comparison.

Why these default sizes (hidden 128, 2 layers, 4 heads, MLP 512, tied embeddings: 538,624
parameters): on a 2-core CPU the RL demo needs about a thousand sampled tokens and a few
thousand trained tokens per step in well under a second; a 4M-parameter model was measured
about 3x slower on both. A 1.3M-parameter variant (hidden 256, 8 heads) learned the task no
faster per SFT step while costing about 2x per step, so it buys no RL headroom here.

`load_policy` goes through `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer` with
`local_files_only=True`, so a local Qwen2.5-Math directory loads exactly like ours.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conspo.models.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)


class TinyModelConfig(BaseModel):
    """Sizes of the tiny model. Defaults: the embedded demo's model (~0.54M parameters)."""

    model_config = ConfigDict(frozen=True)

    arch: Literal["qwen2", "llama"] = "qwen2"
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 128
    rope_theta: float = 10_000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02


def _hf_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase):
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if cfg.arch == "qwen2":
        return Qwen2Config(**common), Qwen2ForCausalLM
    return LlamaConfig(**common), LlamaForCausalLM


def build_tiny_model(
    config: TinyModelConfig | None = None, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A freshly initialised tiny causal LM (float32, CPU) and its character tokenizer.

    The initialisation is a pure function of `seed`: the global torch RNG is forked, seeded and
    restored, so callers' random state is untouched.
    """
    cfg = config or TinyModelConfig()
    tokenizer = build_char_tokenizer()
    hf_config, cls = _hf_config(cfg, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(hf_config)
    model.to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path
) -> Path:
    """Write a `from_pretrained` directory: safetensors weights, config, tokenizer files."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest prompt + completion the model accepts: its position limit, else the tokenizer's
    ``model_max_length`` (when sensible), else 2048."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**7:
        return value
    return 2048


def load_policy(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any local Hugging Face causal-LM directory (ours or a real one) in eval mode.

    The tokenizer is set to left padding (what batched sampling wants) and gets a pad token
    (EOS) if the checkpoint has none. Nothing is fetched from a hub.
    """
    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
