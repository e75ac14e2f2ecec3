"""Per-group sampling settings: the seed of a group and the token budget its prompt leaves.

The seed of a group is a pure function of the run's seed and the prompt's stream entry id, so a
prompt that is redone after a crash is sampled with the same seed (and, with a backend that
seeds per group, gives the same completions). Encoding a prompt into ids is shared with
evaluation and lives in ``conspo.prompting``.
"""

from __future__ import annotations

import hashlib

from conspo.protocol import SamplingParams


def group_seed(run_seed: int, entry_id: str) -> int:
    """A 31-bit seed from the run's seed and the prompt's entry id (stable across processes)."""
    digest = hashlib.blake2b(f"{run_seed}:{entry_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def group_params(
    base: SamplingParams, *, prompt_len: int, max_model_len: int, seed: int
) -> SamplingParams:
    """``base`` with this group's seed, and the token budget cut to what the context leaves."""
    budget = max(1, min(base.max_tokens, max_model_len - prompt_len))
    return base.model_copy(update={"seed": seed, "max_tokens": budget})
