"""Teacher-forced completion log-probs for the learner (and the warm start).

`completion_logprobs` returns, for each completion token, `log_softmax(logits / temperature)`
of that token given the prompt and the preceding completion tokens, with autograd. With the
same weights and temperature it equals the behaviour log-probs that `sample_groups` records
(tested to 1e-4; in float32 the gap is ~1e-6). `temperature == 0` is treated as 1, matching
the sampler's greedy convention.

Design choices:
- Rows are `prompt + completion`, RIGHT-padded, with no attention mask: under the causal mask
  a real token never sees the padding after it, positions start at 0 for every row (as in the
  sampler, whose left padding is compensated by explicit position ids), and there are no
  fully-masked query rows (which give NaN in some attention kernels and NaN gradients).
- Only the positions that predict completion tokens go through `log_softmax`; the model is
  asked for the last `logits_to_keep` positions only, which skips the LM head on most of a long
  prompt (the largest tensor for a 150k-token vocabulary).
- `token_budget` bounds the padded tokens (rows x longest row) of one forward pass: rows are
  sorted by length, cut into chunks that fit (a row longer than the budget is a chunk alone),
  and the outputs are scattered back into the caller's order. Every chunk's output keeps its
  autograd graph, so a backward through the returned tensor reaches every chunk; the budget
  bounds the transient tensors of each forward, not the activations saved for backward. A
  learner that needs the latter bounded calls this once per micro-batch and backpropagates
  each (with ConSPO's per-completion coefficients computed on whole groups first).
- Outputs are zero where `mask` is 0, so sums over tokens need no masking.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def _plan_chunks(lengths: Sequence[int], token_budget: int | None) -> list[list[int]]:
    """Row indices per forward pass, each chunk's rows x max length within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if token_budget is None:
        return [order]
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending lengths: the newest row is the longest of its chunk
        if current and (len(current) + 1) * lengths[i] > token_budget:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


def _forward_chunk(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    t_max: int,
    temperature: float,
    with_entropy: bool,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    device = model.device
    rows = len(prompts)
    p_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    c_len = torch.tensor([len(c) for c in completions], dtype=torch.long)
    total = p_len + c_len
    width = int(total.max())
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[r, : len(p) + len(c)] = torch.as_tensor(list(p) + list(c), dtype=torch.long)
    # Completion token t of row r sits at position p_len[r] + t and is predicted at the
    # position before it. Keep logits from the earliest such position onwards.
    first = int(p_len.min()) - 1
    keep = width - first
    out = model(input_ids=input_ids.to(device), use_cache=False, logits_to_keep=keep)
    logits = out.logits  # [rows, keep, V]
    t_idx = torch.arange(t_max)
    pos = (p_len[:, None] - 1 - first + t_idx[None, :]).clamp(max=keep - 1)  # [rows, t_max]
    valid = t_idx[None, :] < c_len[:, None]
    pos = pos.to(logits.device)
    sel = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()
    logp_all = torch.log_softmax(sel / temperature, dim=-1)
    targets = input_ids.gather(1, (p_len[:, None] + t_idx[None, :]).clamp(max=width - 1))
    targets = targets.to(logits.device)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    valid = valid.to(logits.device)
    logp = logp.masked_fill(~valid, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~valid, 0.0)
    return logp, entropy


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    token_budget: int | None = None,
    with_entropy: bool = False,
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of each completion given its prompt, right-padded.

    Returns `(logprobs [B, Tmax], mask [B, Tmax], entropy [B, Tmax] or None)`, float32 on the
    model's device; `mask` is 1.0 on real completion tokens, 0.0 on padding, and `logprobs`
    and `entropy` are 0.0 there. `entropy` is that of the tempered distribution at each
    position. Gradients flow to the model through every chunk (see module docstring).
    """
    if len(prompt_ids) != len(completion_ids):
        raise ValueError("prompt_ids and completion_ids differ in length")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt")
    if token_budget is not None and token_budget < 1:
        raise ValueError("token_budget must be >= 1")
    temp = 1.0 if temperature <= 0.0 else float(temperature)
    B = len(prompt_ids)
    t_max = max((len(c) for c in completion_ids), default=0)
    device = model.device
    mask = torch.zeros((B, t_max), dtype=torch.float32)
    for r, c in enumerate(completion_ids):
        mask[r, : len(c)] = 1.0
    mask = mask.to(device)
    if B == 0 or t_max == 0:
        zeros = torch.zeros((B, t_max), dtype=torch.float32, device=device)
        return zeros, mask, (zeros.clone() if with_entropy else None)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None)
        if not isinstance(pad_id, int):
            pad_id = 0

    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    chunks = _plan_chunks(lengths, token_budget)
    logps: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    for chunk in chunks:
        logp, ent = _forward_chunk(
            model,
            [prompt_ids[i] for i in chunk],
            [completion_ids[i] for i in chunk],
            t_max,
            temp,
            with_entropy,
            pad_id,
        )
        logps.append(logp)
        if ent is not None:
            ents.append(ent)
    order = [i for chunk in chunks for i in chunk]
    inverse = torch.empty(B, dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(B)
    inverse = inverse.to(device)
    logprobs = torch.cat(logps, dim=0).index_select(0, inverse)
    entropy = torch.cat(ents, dim=0).index_select(0, inverse) if with_entropy else None
    return logprobs, mask, entropy
