"""The verifier replica's loop: rollouts -> grades -> labeled, exactly once per group.

Replicas share the ``verifiers`` consumer group and nothing else. Each read batch is graded in
one ``GradingPool.grade`` call, so the pool's processes work on completions of several groups at
once; each group is then committed on its own through the idempotent commit (marker
``done:verify:<group id>``, one ``labeled`` entry, ack, counters), so a replica killed between
two commits leaves the rest of its batch to be reclaimed, and a group delivered twice is labelled
once. A pool failure (not an item's content: those become verdicts) releases the batch for
immediate redelivery and rebuilds the pool.

The replica also publishes the verifier names it offers (``conspo.serving``): the built-ins and
its plugins, imported once in this process for the purpose (the graders import them again in
their own processes), so the api can refuse a prompt that names a verifier nobody offers.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable

import redis

from conspo import counters
from conspo.grading.config import GradeItem
from conspo.lineage import VERIFY
from conspo.protocol import LabeledGroup, RolloutGroup
from conspo.queue import Commit, StreamQueue, markers
from conspo.service import ServiceRuntime
from conspo.serving import publish_verifiers
from conspo.settings import VerifierSettings
from services.verifier.metrics import VerifierMetrics
from services.verifier.pool import GradingPool, PoolError, load_plugin

log = logging.getLogger(__name__)


def offered_verifiers(plugins: list[str]) -> list[str]:
    """The verifier names this replica's graders will know: built-ins plus plugins."""
    from services.verifier.verifiers import known_verifiers

    for plugin in plugins:
        try:
            load_plugin(plugin)
        except Exception as exc:  # the graders will report it; the names are only advisory
            log.warning("verifier plugin %s does not import here: %s", plugin, exc)
    return known_verifiers()


def make_pool(settings: VerifierSettings) -> GradingPool:
    return GradingPool(
        processes=settings.processes,
        timeout_s=settings.timeout_s,
        config=settings.grade_config,
        plugins=settings.plugins,
        memory_limit_mb=settings.memory_limit_mb,
    )


class VerifierWorker:
    def __init__(
        self,
        runtime: ServiceRuntime,
        settings: VerifierSettings,
        pool_factory: Callable[[], GradingPool],
    ) -> None:
        self.rt = runtime
        self.settings = settings
        self.pool_factory = pool_factory
        self.pool: GradingPool | None = None
        common = {
            "max_deliveries": settings.max_deliveries,
            "visibility_timeout_s": settings.visibility_timeout_s,
            "max_entry_bytes": settings.max_entry_bytes,
        }
        self.rollouts = StreamQueue(
            runtime.client, runtime.keys, "rollouts", RolloutGroup, **common
        )
        self.labeled = StreamQueue(runtime.client, runtime.keys, "labeled", LabeledGroup, **common)
        self.metrics = VerifierMetrics(runtime.registry)
        self._last_trim = time.monotonic()
        self._last_dead_check = 0.0
        self.offered = offered_verifiers(list(settings.plugins))
        runtime.info["verifiers"] = ",".join(self.offered)

    def run(self) -> None:
        # The pool starts before the first read, not on it: its forkserver imports math-verify
        # (~0.6 s), which otherwise delayed the run's first labelled groups. A pool that fails
        # here is retried on the first batch, as after any pool failure.
        if self.pool is None:
            try:
                self.pool = self.pool_factory()
            except PoolError as exc:
                self.rt.error(f"grading pool failed to start: {exc}; retrying on the first batch")
        self.rt.status = "running"
        self._publish_offered()
        backoff = 0.5
        try:
            while not self.rt.stopping:
                errors = self.rt.error_count
                try:
                    self.step()
                    backoff = 0.5
                    if self.rt.error_count == errors:
                        self.rt.recovered()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self.rt.error(f"redis unavailable: {exc}; retrying in {backoff:.1f}s")
                    self.rt.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            self.rt.status = "stopping"
            if self.pool is not None:
                self.pool.close()

    def step(self) -> int:
        """Read one batch, label it, commit each group; returns groups committed."""
        if time.monotonic() - self._last_dead_check >= self.settings.heartbeat_s:
            self._last_dead_check = time.monotonic()
            self.rt.hand_back_from_the_dead(self.rollouts)  # a killed replica's groups
        deliveries = self.rollouts.read(
            self.rt.instance, count=self.settings.groups_per_read, block_ms=self.settings.block_ms
        )
        self._housekeeping()
        if not deliveries:
            return 0
        fresh = []
        done = markers(  # one round trip for the batch, not one per group
            self.rt.client, self.rt.keys, [(VERIFY, d.message.group_id) for d in deliveries]
        )
        for d, marker in zip(deliveries, done, strict=True):
            if marker is not None:
                self.rollouts.ack(d)  # labelled by a replica that died before its ack
                self.metrics.duplicates.inc()
            else:
                fresh.append(d)
        if not fresh:
            return 0
        if self.rt.stopping:
            self.rollouts.release(*fresh)
            return 0
        items = [
            GradeItem(
                completion=c.text, gold=d.message.prompt.answer, verifier=d.message.prompt.verifier
            )
            for d in fresh
            for c in d.message.completions
        ]
        started = time.monotonic()
        try:
            if self.pool is None:
                self.pool = self.pool_factory()
            labels = self.pool.grade(items)
        except PoolError as exc:
            self.rt.error(f"grading pool failed: {exc}; releasing {len(fresh)} groups")
            self.rollouts.release(*fresh)
            if self.pool is not None:
                self.pool.close()
            self.pool = None
            self.rt.sleep(1.0)
            return 0
        per_group = (time.monotonic() - started) / len(fresh)
        commits: list[Commit] = []
        offset = 0
        for d in fresh:
            n = len(d.message.completions)
            group_labels, offset = labels[offset : offset + n], offset + n
            labeled = LabeledGroup(
                rollout=d.message,
                labels=group_labels,
                verifier_id=self.rt.instance,
                verify_seconds=per_group,
            )
            verdicts = Tally(counters.verdict(label.verdict.value) for label in group_labels)
            commits.append(
                Commit(
                    d,
                    stage=VERIFY,
                    item=d.message.group_id,
                    outputs=[(self.labeled, labeled, d.message.group_id)],
                    counters={
                        counters.VERIFIER_GROUPS: 1,
                        counters.VERIFIER_COMPLETIONS: n,
                        **verdicts,
                    },
                )
            )
        # One round trip for the batch; each group's commit is still atomic on its own.
        committed = 0
        for c, (_, fresh_commit) in zip(commits, self.rollouts.commit_many(commits), strict=True):
            if fresh_commit:
                committed += 1
                self.metrics.observe(c.outputs[0][1].labels, per_group)
            else:
                self.metrics.duplicates.inc()
        self.rt.info.update(self.metrics.summary())
        return committed

    def _publish_offered(self) -> None:
        try:
            publish_verifiers(self.rt.client, self.rt.keys, self.offered)
        except redis.RedisError as exc:
            log.warning("could not publish the verifier names: %s", exc)

    def _housekeeping(self) -> None:
        if time.monotonic() - self._last_trim < 10.0:
            return
        self._last_trim = time.monotonic()
        self._publish_offered()  # again, in case Redis lost it
        self.metrics.backlog.set(self.rollouts.backlog().outstanding)
        self.rollouts.trim(keep_last=self.settings.retain_entries)
