"""Assembling a step's groups from ``labeled``, in stream order, deterministically.

Every decision is a function of the entry's position in the stream, the learner version when the
step is assembled and the LEARN markers, never of timing: entries are buffered as they are read
and classified only when the step being assembled reaches them. A restart replays the same
entries (its own pending ones first, in stream order, then new ones) against the same
checkpointed version, so it takes the same decisions and trains the same groups in the same steps.

Classification of the next entry:

1. already in hand (an entry redelivered by a reclaim while we still hold it): ignored;
2. its group is marked done for LEARN, or is already in hand under another entry id: a
   duplicate, acked at once (its effect is already recorded or will be);
3. ``version - policy_version > max_staleness``: dropped (``dropped:stale``);
4. all rewards equal and ``skip_uninformative``: skipped (``skipped:all_equal``);
5. otherwise trained in this step (``trained:<step>``, known once the step commits).

Decided entries stay pending (unacked, no marker) until the checkpoint that records them is
committed, or, for skipped and dropped ones, until the learner releases them through its ledger
(``services.learner.checkpoint.Ledger``); ``LearnerService`` then marks and acks them. While held,
their idle time is renewed with ``XCLAIM ... JUSTID`` (which does not count as a delivery), so
``StreamQueue.read``'s reclaim of idle entries never hands our own held entries back or
dead-letters them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from conspo.lineage import LEARN, learn_marker
from conspo.protocol import LabeledGroup
from conspo.queue import Delivery, StreamQueue, markers
from services.learner.data import TrainGroup, all_equal_rewards

log = logging.getLogger(__name__)

SKIPPED = learn_marker("skipped", "all_equal")
DROPPED = learn_marker("dropped", "stale")


@dataclass
class Decided:
    delivery: Delivery[LabeledGroup]
    group_id: str
    marker: str


@dataclass
class Batch:
    """One step's worth of decisions."""

    train: list[Delivery[LabeledGroup]] = field(default_factory=list)
    skipped: list[Decided] = field(default_factory=list)
    dropped: list[Decided] = field(default_factory=list)
    duplicates: int = 0
    staleness: Counter = field(default_factory=Counter)
    wait_seconds: float = 0.0
    complete: bool = False

    @property
    def groups(self) -> list[TrainGroup]:
        return [TrainGroup.from_labeled(d.message) for d in self.train]

    @property
    def seen(self) -> int:
        return len(self.train) + len(self.skipped) + len(self.dropped)


class Batcher:
    def __init__(
        self,
        queue: StreamQueue[LabeledGroup],
        consumer: str,
        *,
        batch_groups: int,
        max_staleness: int,
        skip_uninformative: bool = True,
        block_ms: int = 1000,
        read_count: int | None = None,
    ) -> None:
        self.queue = queue
        self.consumer = consumer
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness
        self.skip_uninformative = skip_uninformative
        self.block_ms = block_ms
        self.read_count = read_count or max(batch_groups, 16)
        self._buffer: deque[Delivery[LabeledGroup]] = deque()
        self._held_entries: set[str] = set()
        self._held_groups: set[str] = set()
        self._last_renew = 0.0
        self._on_decided: Callable[[Decided], None] | None = None
        self.duplicates_total = 0
        # LEARN markers of buffered groups, read in one round trip for the whole buffer, not one
        # per group. Only this learner writes them, and it forgets held groups through
        # ``release_held`` right after writing their markers: that clears the cache, so a
        # cached "not done" is never older than the learner's own last mark.
        self._done: dict[str, bool] = {}

    # -- holding ----------------------------------------------------------------------------------
    def hold(self, entry_id: str, group_id: str) -> None:
        self._held_entries.add(entry_id)
        self._held_groups.add(group_id)

    def release_held(self, entry_ids: list[str], group_ids: list[str]) -> None:
        """Forget entries once acked (their markers now answer duplicate checks)."""
        self._held_entries.difference_update(entry_ids)
        self._held_groups.difference_update(group_ids)
        self._done.clear()

    def replay(self, deliveries: list[Delivery[LabeledGroup]]) -> None:
        """Own pending entries found at start-up: classified before anything new."""
        for d in deliveries:
            self._buffer.append(d)
            self._held_entries.add(d.entry_id)

    def renew(self, every_s: float) -> None:
        """Reset the idle time of every entry we hold so no reclaim takes it from us."""
        now = time.monotonic()
        if now - self._last_renew < every_s:
            return
        self._last_renew = now
        ids = sorted(self._held_entries)
        q = self.queue
        for i in range(0, len(ids), 1000):
            q.client.xclaim(
                q.key, q.group, self.consumer, min_idle_time=0, message_ids=ids[i : i + 1000],
                justid=True,
            )  # fmt: skip

    # -- assembling -------------------------------------------------------------------------------
    def next_batch(
        self,
        version: int,
        *,
        should_stop: Callable[[], bool],
        wait_timeout_s: float = 0.0,
        renew_every_s: float = 20.0,
        on_decided: Callable[[Decided], None] | None = None,
        on_wait: Callable[[int, float], None] | None = None,
    ) -> Batch:
        """Pull until ``batch_groups`` groups to train are in hand (``complete``), or stop /
        time out with ``complete=False`` (entries chosen for training are put back).

        ``on_decided`` is called for each skipped or dropped group the moment it is decided:
        generators' budget grows with them, and waiting for the batch to complete before
        reporting them could deadlock a tight budget (``max_staleness=0``). ``on_wait(in_hand,
        idle_s)`` is called before every read (at least once per ``block_ms`` while nothing
        arrives), with the groups to train in hand and the seconds since data last arrived:
        the learner counts, explains and releases from there."""
        batch = Batch()
        self._on_decided = on_decided
        start = time.monotonic()
        last_data = start
        while len(batch.train) < self.batch_groups:
            if not self._buffer:
                if should_stop():
                    break
                if wait_timeout_s > 0 and time.monotonic() - last_data > wait_timeout_s:
                    log.info("no new labelled groups for %.0fs", wait_timeout_s)
                    break
                if on_wait is not None:
                    on_wait(len(batch.train), time.monotonic() - last_data)
                self.renew(renew_every_s)
                got = self.queue.read(self.consumer, count=self.read_count, block_ms=self.block_ms)
                fresh = [d for d in got if d.entry_id not in self._held_entries]
                for d in fresh:
                    self._buffer.append(d)
                    self._held_entries.add(d.entry_id)
                if fresh:
                    last_data = time.monotonic()
                continue
            self._classify(self._buffer.popleft(), version, batch)
        batch.wait_seconds = time.monotonic() - start
        batch.complete = len(batch.train) >= self.batch_groups
        if not batch.complete:
            # Not trained: back to the front, in order (still pending for a restart too).
            for d in reversed(batch.train):
                self._buffer.appendleft(d)
                self._held_groups.discard(d.message.group_id)
            batch.train = []
            batch.staleness = Counter()
        return batch

    def _decided(self, decided: Decided) -> Decided:
        if self._on_decided is not None:
            self._on_decided(decided)
        return decided

    def _is_done(self, gid: str) -> bool:
        if gid not in self._done:
            wanted = [gid, *{d.message.group_id for d in self._buffer} - self._done.keys() - {gid}]
            found = markers(self.queue.client, self.queue.keys, [(LEARN, g) for g in wanted])
            self._done.update({g: m is not None for g, m in zip(wanted, found, strict=True)})
        return self._done[gid]

    def _classify(self, d: Delivery[LabeledGroup], version: int, batch: Batch) -> None:
        group = d.message
        gid = group.group_id
        if gid in self._held_groups or self._is_done(gid):
            self.queue.ack(d)
            self._held_entries.discard(d.entry_id)
            batch.duplicates += 1
            self.duplicates_total += 1
            log.info("duplicate group %s (entry %s): acked without training", gid, d.entry_id)
            return
        self._held_groups.add(gid)
        staleness = version - group.rollout.policy_version
        if staleness > self.max_staleness:
            batch.dropped.append(self._decided(Decided(d, gid, DROPPED)))
            return
        if self.skip_uninformative and all_equal_rewards(group.rewards):
            batch.skipped.append(self._decided(Decided(d, gid, SKIPPED)))
            return
        batch.train.append(d)
        batch.staleness[staleness] += 1
