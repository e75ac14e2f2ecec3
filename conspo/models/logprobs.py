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
- `share_prompts`: the rows of an RL batch come in groups of G completions of ONE prompt, and
  the flat layout runs that prompt through the model G times. Shared, each distinct prompt
  but its last token runs once (a prefill into a KV cache, with autograd), the cache rows are
  gathered to one per completion, and a second pass runs `last prompt token + completion` on
  top of it, with the prefix's padding masked out and explicit positions. The log-probs are
  the same computation (tested equal to 1e-5, gradients too); the forward cost drops from
  G x (prompt + completion) to prompt + G x (1 + completion) tokens per group: 1.75x less time
  for a forward+backward of the arith demo's batch (docs/benchmarks.md, vs TRL). Chunks are
  then whole prompts, cut under `token_budget` like the flat rows.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from functools import partial

import torch
from transformers import DynamicCache, PreTrainedModel

logger = logging.getLogger(__name__)


def _cut(
    order: Sequence[int], cost: Callable[[list[int]], int], token_budget: int | None
) -> list[list[int]]:
    """``order`` cut greedily into chunks whose ``cost`` fits the budget (an item that alone
    exceeds it is a chunk alone)."""
    if token_budget is None:
        return [list(order)]
    chunks: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and cost([*current, i]) > token_budget:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


def _plan_chunks(lengths: Sequence[int], token_budget: int | None) -> list[list[int]]:
    """Row indices per forward pass, each chunk's rows x max length within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    # Ascending lengths: a chunk's last row is its longest.
    return _cut(order, lambda chunk: len(chunk) * lengths[chunk[-1]], token_budget)


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
    sel = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
    targets = input_ids.gather(1, (p_len[:, None] + t_idx[None, :]).clamp(max=width - 1))
    return _tempered(sel, targets.to(logits.device), valid.to(logits.device), temperature,
                     with_entropy)  # fmt: skip


def _tempered(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits / T) at ``targets`` (and the entropy), zero where not ``valid``."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(~valid, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~valid, 0.0)
    return logp, entropy


def cache_kwarg(model: PreTrainedModel) -> str:
    """transformers >= 5.2x calls the KV cache argument `cache`; earlier versions
    `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: PreTrainedModel) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _plan_prompt_chunks(
    prompt_lens: Sequence[int], widths: Sequence[int], rows: Sequence[int], token_budget: int | None
) -> list[list[int]]:
    """Distinct-prompt indices per shared forward: prompts sorted by their longest completion,
    each chunk's prefill plus ``rows x (1 + longest completion)`` within the budget."""
    order = sorted(range(len(widths)), key=lambda i: (widths[i], prompt_lens[i]))

    def cost(chunk: list[int]) -> int:  # ascending widths: the last prompt's is the longest
        prefill = len(chunk) * max(prompt_lens[i] for i in chunk)
        return sum(rows[i] for i in chunk) * (1 + widths[chunk[-1]]) + prefill

    return _cut(order, cost, token_budget)


def _forward_shared(
    model: PreTrainedModel,
    prefixes: Sequence[Sequence[int]],
    lasts: Sequence[int],
    owner: Sequence[int],
    completions: Sequence[Sequence[int]],
    t_max: int,
    temperature: float,
    with_entropy: bool,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of the shared layout: ``prefixes[k]`` is distinct prompt k without its last
    token ``lasts[k]``; completion row r belongs to prompt ``owner[r]``."""
    device = model.device
    kwarg = cache_kwarg(model)
    cache = new_cache(model)
    owner_t = torch.tensor(owner, dtype=torch.long)
    pre_len = torch.tensor([len(p) for p in prefixes], dtype=torch.long)
    width_pre = int(pre_len.max())
    rows = len(completions)
    c_len = torch.tensor([len(c) for c in completions], dtype=torch.long)
    width = 1 + int(c_len.max())
    if width_pre > 0:
        # Right padding and no mask here: a real token never sees the padding after it, and
        # every padded position sees real or padded tokens only (finite, no fully masked row);
        # the second pass masks the padding out of the keys.
        pre = torch.full((len(prefixes), width_pre), pad_id, dtype=torch.long)
        for k, p in enumerate(prefixes):
            if len(p):
                pre[k, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        model(input_ids=pre.to(device), use_cache=True, logits_to_keep=1, **{kwarg: cache})
        cache.batch_select_indices(owner_t.to(device))  # one cache row per completion (autograd)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    for r, c in enumerate(completions):
        input_ids[r, 0] = lasts[owner[r]]
        if len(c):
            input_ids[r, 1 : 1 + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
    positions = pre_len[owner_t][:, None] + torch.arange(width)[None, :]
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int):  # only padding lies past a row's own end: keep it in range
        positions = positions.clamp(max=limit - 1)
    attention = torch.ones((rows, width_pre + width), dtype=torch.long)
    attention[:, :width_pre] = torch.arange(width_pre)[None, :] < pre_len[owner_t][:, None]
    out = model(
        input_ids=input_ids.to(device),
        position_ids=positions.to(device),
        attention_mask=attention.to(device),
        use_cache=True,
        logits_to_keep=width,
        **{kwarg: cache},
    )
    t_idx = torch.arange(t_max)
    keep = min(t_max, width - 1)
    logits = out.logits[:, :keep]  # position t predicts completion token t
    targets = input_ids[:, 1 : 1 + keep].to(logits.device)
    valid = (t_idx[None, :keep] < c_len[:, None]).to(logits.device)
    logp, entropy = _tempered(logits, targets, valid, temperature, with_entropy)
    if keep < t_max:  # this chunk's completions are shorter than the call's longest
        logp = torch.nn.functional.pad(logp, (0, t_max - keep))
        if entropy is not None:
            entropy = torch.nn.functional.pad(entropy, (0, t_max - keep))
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
    share_prompts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of each completion given its prompt, right-padded.

    Returns `(logprobs [B, Tmax], mask [B, Tmax], entropy [B, Tmax] or None)`, float32 on the
    model's device; `mask` is 1.0 on real completion tokens, 0.0 on padding, and `logprobs`
    and `entropy` are 0.0 there. `entropy` is that of the tempered distribution at each
    position. Gradients flow to the model through every chunk (see module docstring).
    `share_prompts` runs each distinct prompt once (module docstring); it is used only when
    some prompt repeats and gradient checkpointing is off.
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

    logps: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    distinct: dict[tuple[int, ...], list[int]] = {}
    # Under gradient checkpointing transformers turns the KV cache off, so the second pass
    # would not see the prefix: that layout is not shared.
    share_prompts = share_prompts and not getattr(model, "is_gradient_checkpointing", False)
    if share_prompts:
        for r, p in enumerate(prompt_ids):
            distinct.setdefault(tuple(p), []).append(r)
    # One forward per chunk, each with the rows (caller's indices) it returns, in that order.
    passes: list[tuple[list[int], Callable[..., tuple[torch.Tensor, torch.Tensor | None]]]] = []
    if share_prompts and len(distinct) < B:
        prompts = list(distinct)
        members = list(distinct.values())
        widths = [max(len(completion_ids[r]) for r in m) for m in members]
        for chunk in _plan_prompt_chunks(
            [len(p) - 1 for p in prompts], widths, [len(m) for m in members], token_budget
        ):
            rows = [r for pi in chunk for r in members[pi]]
            owner = [k for k, pi in enumerate(chunk) for _ in members[pi]]
            forward = partial(
                _forward_shared,
                model,
                [prompts[pi][:-1] for pi in chunk],
                [prompts[pi][-1] for pi in chunk],
                owner,
                [completion_ids[r] for r in rows],
            )
            passes.append((rows, forward))
    else:
        lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
        for chunk in _plan_chunks(lengths, token_budget):
            forward = partial(
                _forward_chunk,
                model,
                [prompt_ids[i] for i in chunk],
                [completion_ids[i] for i in chunk],
            )
            passes.append((chunk, forward))
    order: list[int] = []
    for rows, forward in passes:
        logp, ent = forward(t_max, temp, with_entropy, pad_id)
        logps.append(logp)
        if ent is not None:
            ents.append(ent)
        order.extend(rows)
    inverse = torch.empty(B, dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(B)
    inverse = inverse.to(device)
    logprobs = torch.cat(logps, dim=0).index_select(0, inverse)
    entropy = torch.cat(ents, dim=0).index_select(0, inverse) if with_entropy else None
    return logprobs, mask, entropy
