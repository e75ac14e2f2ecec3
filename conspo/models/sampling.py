"""Batched group sampling for the `hf` generator backend (and for evaluation).

Why a hand-written KV-cache loop rather than `model.generate`: we need (1) the behaviour
log-prob of every sampled token with exact, documented semantics, (2) reproducible sampling
from a private `torch.Generator` (`generate` draws from the global RNG), (3) stop strings with
a precise truncation rule, and (4) low per-step overhead for tiny models on a CPU, where the
logits processors and stopping criteria of `generate` cost as much as the model. The loop works
for any `transformers` causal LM that accepts `position_ids`, a 2-D `attention_mask` and a
`DynamicCache` (Llama, Qwen2, ...).

Semantics the learner depends on (keep them exactly):
- The behaviour log-prob of a sampled token is `log_softmax(logits / temperature)` at its
  position, computed BEFORE top-p truncation: it is the log-prob of the token under the
  tempered policy, not under the truncated sampling distribution. `completion_logprobs`
  (teacher forcing) with the same temperature reproduces it to float precision.
- `temperature == 0` means greedy decoding (argmax of the logits); the log-probs then use
  temperature 1 (the untempered policy).
- EOS (the tokenizer's EOS and any EOS ids in the model's generation config) ends a completion
  with finish_reason "stop"; the EOS token is part of `token_ids` and has a log-prob, because the
  learner trains on it. `text` is decoded with special tokens skipped.
- A stop string ends a completion with finish_reason "stop" at the token that completed it:
  that token is kept (with any characters it carries past the stop string), nothing after it
  is generated, and the stop string stays in `text`.
- Reaching `max_new_tokens` without EOS or stop string gives finish_reason "length".
- Prompts are left-padded; position ids restart at 0 at each prompt's first real token, so a
  padded row computes exactly what it would alone.
- Each prompt is prefilled once; its KV cache and last logits are repeated `n` times for the
  group. Rows that finish are dropped from the batch (cache rows included) once a quarter
  of the batch has finished: a compaction copies the whole cache.
- Randomness comes only from a `torch.Generator` seeded with `seed` (fresh entropy when
  `seed is None`), so a seed reproduces the output exactly for the same inputs, weights and
  batching (`max_batch_rows`), and the global RNG is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from conspo.models.logprobs import cache_kwarg, new_cache

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(slots=True)
class Sample:
    """One completion: sampled ids (EOS included when it ended the completion), the behaviour
    log-prob of each id, the decoded text (special tokens skipped) and why it ended."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's EOS plus any EOS ids of the model's generation config."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra is not None:
        ids.update(int(i) for i in extra)
    return ids


def _pick_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled ids [R] and their behaviour log-probs [R] (tempered, before top-p)."""
    logits = logits.float()
    if temperature <= 0.0:
        logp = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        probs = logp.exp()
        if top_p < 1.0:
            sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, sorted_idx, sorted_probs)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class _StopChecker:
    """Detects a stop string completed by the newest token, decoding only a short tail."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # A stop string of L characters spans at most L tokens that each carry a character;
        # the slack covers tokens that decode to nothing on their own (partial UTF-8 bytes).
        self.window = 2 * max((len(s) for s in self.stop), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.stop)

    def completed(self, token_ids: list[int]) -> bool:
        tail = token_ids[-self.window :]
        text = self.tokenizer.decode(tail, skip_special_tokens=True)
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=True)
        return any(s in text and s not in before for s in self.stop)


@torch.inference_mode()
def _sample_chunk(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    stop_checker: _StopChecker,
    generator: torch.Generator,
    cache_kwarg: str,
) -> list[tuple[list[int], list[float], FinishReason]]:
    device = model.device
    P = len(prompts)
    lengths = [len(p) for p in prompts]
    L = max(lengths)
    input_ids = torch.full((P, L), pad_id, dtype=torch.long)
    attn = torch.zeros((P, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        attn[i, L - len(p) :] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    input_ids, attn, position_ids = input_ids.to(device), attn.to(device), position_ids.to(device)

    cache = new_cache(model)
    out = model(
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg: cache},
    )
    logits = out.logits[:, -1, :].repeat_interleave(n, dim=0)
    if n > 1:
        cache.batch_repeat_interleave(n)
    attn = attn.repeat_interleave(n, dim=0)
    next_pos = torch.as_tensor(lengths, dtype=torch.long, device=device).repeat_interleave(n)

    R = P * n
    tokens_out: list[list[int]] = [[] for _ in range(R)]
    logps_out: list[list[float]] = [[] for _ in range(R)]
    reasons: list[FinishReason] = ["length"] * R
    rows = list(range(R))  # batch row -> output row
    alive = [True] * R  # per batch row; finished rows stay until the next compaction

    for step in range(max_new_tokens):
        tokens, logps = _pick_tokens(logits, temperature, top_p, generator)
        tok_list = tokens.tolist()
        logp_list = logps.tolist()
        for b, row in enumerate(rows):
            if not alive[b]:
                continue
            tok = tok_list[b]
            tokens_out[row].append(tok)
            logps_out[row].append(logp_list[b])
            if tok in eos_ids or (stop_checker and stop_checker.completed(tokens_out[row])):
                reasons[row] = "stop"
                alive[b] = False
        n_alive = sum(alive)
        if n_alive == 0 or step == max_new_tokens - 1:
            break
        # Dropping finished rows copies the whole cache: worth it only in bulk.
        if len(rows) - n_alive >= max(1, len(rows) // 4):
            keep = [b for b in range(len(rows)) if alive[b]]
            index = torch.as_tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            tokens, attn, next_pos = tokens[index], attn[index], next_pos[index]
            rows = [rows[b] for b in keep]
            alive = [True] * len(rows)
        attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
        out = model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=attn,
            position_ids=next_pos.unsqueeze(-1),
            use_cache=True,
            **{cache_kwarg: cache},
        )
        logits = out.logits[:, -1, :]
        next_pos = next_pos + 1
    return [(tokens_out[r], logps_out[r], reasons[r]) for r in range(R)]


def sample_groups(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    max_batch_rows: int | None = None,
) -> list[list[Sample]]:
    """Sample `n` completions for each prompt; result[i] is the group of prompt i.

    `prompt_ids` are token ids as the model should see them (BOS included if the model wants
    one). `max_batch_rows` bounds the rows (prompts x n) decoded together; whole groups are
    kept in one chunk. See the module docstring for the exact semantics.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1]")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt")
    if not prompt_ids:
        return []
    # The generator lives where the logits are: multinomial refuses a CPU generator for CUDA
    # probabilities (so seeded streams differ between devices, not between runs).
    generator = torch.Generator(device=next(model.parameters()).device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = next(iter(eos_ids), 0)
    stop_checker = _StopChecker(tokenizer, stop or [])
    kwarg = cache_kwarg(model)
    prompts_per_chunk = len(prompt_ids)
    if max_batch_rows is not None:
        prompts_per_chunk = max(1, max_batch_rows // n)

    was_training = model.training
    model.eval()
    groups: list[list[Sample]] = []
    try:
        for start in range(0, len(prompt_ids), prompts_per_chunk):
            chunk = prompt_ids[start : start + prompts_per_chunk]
            rows = _sample_chunk(
                model,
                chunk,
                n=n,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                eos_ids=eos_ids,
                pad_id=int(pad_id),
                stop_checker=stop_checker,
                generator=generator,
                cache_kwarg=kwarg,
            )
            texts = tokenizer.batch_decode([r[0] for r in rows], skip_special_tokens=True)
            samples = [
                Sample(token_ids=ids, logprobs=lps, text=text, finish_reason=reason)
                for (ids, lps, reason), text in zip(rows, texts, strict=True)
            ]
            groups.extend(samples[i * n : (i + 1) * n] for i in range(len(chunk)))
    finally:
        model.train(was_training)
    return groups
