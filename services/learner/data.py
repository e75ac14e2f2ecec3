"""What the trainer sees of a labelled group, and how a step's groups are cut into work.

``TrainGroup`` is a compact, picklable copy of the fields of a ``LabeledGroup`` the update needs
(ids, behaviour log-probs, rewards, temperature, version): rank 0 broadcasts a step's groups to
the other ranks as these, never as raw stream entries, so the other ranks need no Redis.

Work is always cut along group boundaries, because a group's objective couples its completions
(``../shared/design/conspo.md``, ConSPO item 8): ranks receive whole groups (greedy balancing
by padded tokens, deterministic so every rank computes every rank's share without talking), and
each rank's groups are cut into micro-batches of whole groups under ``token_budget`` padded
tokens (rows x longest row, which is what a forward pass really allocates). A group larger than
the budget is a micro-batch on its own. Every rank also knows the largest micro-batch count of
all ranks, so FSDP collectives line up: ranks with fewer micro-batches run zero-weight dummy
ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from conspo.objectives import POSITIVE_THRESHOLD
from conspo.protocol import LabeledGroup, Verdict


@dataclass(frozen=True)
class TrainGroup:
    """The trainer's view of one labelled group (picklable, Redis-free)."""

    group_id: str
    prompt_ids: tuple[int, ...]
    completions: tuple[tuple[int, ...], ...]
    behaviour_logprobs: tuple[tuple[float, ...], ...]
    rewards: tuple[float, ...]
    correct: tuple[bool, ...]
    temperature: float
    max_tokens: int
    policy_version: int

    @classmethod
    def from_labeled(cls, group: LabeledGroup) -> TrainGroup:
        r = group.rollout
        return cls(
            group_id=r.group_id,
            prompt_ids=tuple(r.prompt_token_ids),
            completions=tuple(tuple(c.token_ids) for c in r.completions),
            behaviour_logprobs=tuple(tuple(c.logprobs) for c in r.completions),
            rewards=tuple(float(x) for x in group.rewards),
            correct=tuple(label.verdict == Verdict.CORRECT for label in group.labels),
            temperature=float(r.sampling.temperature),
            max_tokens=int(r.sampling.max_tokens),
            policy_version=int(r.policy_version),
        )

    @property
    def size(self) -> int:
        return len(self.completions)

    @property
    def longest(self) -> int:
        """Longest row (prompt + completion) of the group, in tokens."""
        return len(self.prompt_ids) + max((len(c) for c in self.completions), default=0)

    @property
    def padded_tokens(self) -> int:
        return self.size * self.longest

    @property
    def completion_tokens(self) -> int:
        return sum(len(c) for c in self.completions)

    @property
    def forward_tokens(self) -> int:
        """Real (unpadded) tokens a teacher-forced forward pass processes."""
        return self.size * len(self.prompt_ids) + self.completion_tokens

    @property
    def n_counted_positives(self) -> int:
        """Positives of a group that has both positives and negatives (else 0)."""
        pos = sum(r > POSITIVE_THRESHOLD for r in self.rewards)
        return pos if 0 < pos < len(self.rewards) else 0


def all_equal_rewards(rewards: Sequence[float]) -> bool:
    """No contrast: every completion got the same reward (all right or all wrong)."""
    return len(set(rewards)) <= 1


def assign_to_ranks(groups: Sequence[TrainGroup], world_size: int) -> list[list[int]]:
    """Group indices per rank: whole groups, balanced by padded tokens, stream order kept.

    Longest-processing-time greedy (largest group to the least loaded rank, ties to the lower
    rank), a pure function of the groups, so every rank computes the same assignment.
    """
    if world_size <= 1:
        return [list(range(len(groups)))]
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(len(groups)), key=lambda i: (-groups[i].padded_tokens, i))
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(i)
        load[rank] += groups[i].padded_tokens
    return [sorted(s) for s in shares]


def plan_micro_batches(groups: Sequence[TrainGroup], token_budget: int) -> list[list[int]]:
    """Consecutive whole groups per micro-batch, each within ``token_budget`` padded tokens."""
    batches: list[list[int]] = []
    current: list[int] = []
    rows = longest = 0
    for i, g in enumerate(groups):
        new_rows, new_longest = rows + g.size, max(longest, g.longest)
        if current and new_rows * new_longest > token_budget:
            batches.append(current)
            current, new_rows, new_longest = [], g.size, g.longest
        current.append(i)
        rows, longest = new_rows, new_longest
    if current:
        batches.append(current)
    return batches
