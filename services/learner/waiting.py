"""Why the learner is not stepping, said in one sentence with the numbers.

A learner that waits is not broken, but a user cannot tell "every reward is 0" from "no data"
from "the generators serve old weights" by looking at a step counter that does not move. So
while a step is being assembled, ``WaitStats`` keeps a tally of what arrived (groups skipped for
equal rewards, with their reward values and verdicts; groups dropped as stale, with their policy
versions; groups in hand to train), and ``explain`` turns the tally into a code and a reason:

- ``all_equal_rewards``: most arrivals were skipped, e.g. "last 1,345 groups had equal rewards
  (all 0: verdicts no_answer 5,368): no contrast to train on";
- ``stale``: most arrivals were sampled with weights too old for ``max_staleness``;
- ``filling``: most arrivals are trainable, there are just fewer than B of them so far;
- ``no_data``: nothing arrived (or nothing for ``waiting_after_s``), with what the queues
  upstream hold and how many generators and verifiers are alive.

The learner publishes the result (``conspo.state.Waiting``) once it has waited
``waiting_after_s``, and deletes it when the next step commits.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from services.learner.batcher import SKIPPED, Decided


@dataclass
class WaitStats:
    """What arrived while the current step was being assembled."""

    since: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    skipped: int = 0
    dropped: int = 0
    equal_rewards: Counter = field(default_factory=Counter)
    verdicts: Counter = field(default_factory=Counter)
    stale_versions: Counter = field(default_factory=Counter)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def saw(self, decided: Decided) -> None:
        group = decided.delivery.message
        if decided.marker == SKIPPED:
            self.skipped += 1
            self.equal_rewards[group.rewards[0] if group.rewards else 0.0] += 1
            self.verdicts.update(label.verdict.value for label in group.labels)
        else:
            self.dropped += 1
            self.stale_versions[group.rollout.policy_version] += 1

    def explain(
        self,
        *,
        in_hand: int,
        batch_groups: int,
        idle_s: float,
        quiet_after_s: float,
        version: int,
        max_staleness: int,
        upstream: Callable[[], str],
    ) -> tuple[str, str]:
        """``(code, reason)``; ``upstream()`` describes the queues (called for ``no_data`` only)."""
        parts = {
            "all_equal_rewards": (self.skipped, self._equal_sentence()),
            "stale": (self.dropped, self._stale_sentence(version, max_staleness)),
            "filling": (in_hand, f"{in_hand:,} of {batch_groups:,} groups to train in hand"),
        }
        if not any(n for n, _ in parts.values()):
            return "no_data", (
                f"no labelled group has arrived in {self.elapsed:.0f} s ({upstream()})"
            )
        code = max(parts, key=lambda c: parts[c][0])  # ties: the order above
        sentences = [parts[code][1]] + [t for c, (n, t) in parts.items() if n and c != code]
        if code == "filling" or idle_s >= quiet_after_s:
            sentences.append(f"the last labelled group arrived {idle_s:.0f} s ago")
        if code == "filling" and idle_s >= quiet_after_s:
            code = "no_data"  # trainable groups came, then they stopped coming
            sentences.append(upstream())
        return code, "; ".join(sentences)

    def _equal_sentence(self) -> str:
        if len(self.equal_rewards) == 1:
            (value,) = self.equal_rewards
            values = f"all {value:g}"
        else:
            values = ", ".join(f"all {v:g} in {n:,}" for v, n in self.equal_rewards.most_common())
        verdicts = ", ".join(f"{v} {n:,}" for v, n in self.verdicts.most_common())
        return (
            f"last {self.skipped:,} groups had equal rewards ({values}: verdicts {verdicts}): "
            "no contrast to train on"
        )

    def _stale_sentence(self, version: int, max_staleness: int) -> str:
        if not self.stale_versions:
            return ""
        lo, hi = min(self.stale_versions), max(self.stale_versions)
        versions = f"v{lo}" if lo == hi else f"v{lo}..v{hi}"
        return (
            f"last {self.dropped:,} groups arrived too stale to train on (sampled with {versions}, "
            f"the learner is at v{version}, max_staleness {max_staleness})"
        )
