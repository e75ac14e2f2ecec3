"""The generator's work loop: admit, read prompts, sample groups, publish, apply new weights.

One iteration (``GeneratorLoop.step``):

1. Apply staged weights, if any. This is the only place weights change, and it runs between two
   engine calls, so no request ever sees a half-updated model and every group is tagged with the
   version that sampled all of it.
2. Admission. Stop pulling while the downstream backlog (``rollouts`` lag + pending of the
   verifiers, plus ``labeled`` lag; the learner keeps ``labeled`` entries pending until its
   checkpoint, so those do not count) exceeds ``max_backlog``, or while ``FlowControl.reserve``
   grants nothing (staleness budget, or our weights are too old). Waiting is not polling: the
   loop blocks on the flow wake-up stream, which the learner writes as it consumes groups and
   this process when its subscriber stages weights (``FlowControl.wait``; ``poll_ms`` is only
   the fallback bound). Waiting time is counted.
3. Read up to the granted number of prompts; ack those whose ``generate`` marker exists (another
   generator finished them), dead-letter those that cannot be formatted, and sample G completions
   for the rest in ONE engine call.
4. Publish one ``RolloutGroup`` per prompt through ``StreamQueue.commit``: marker, rollout entry,
   counters and ack in one atomic script, so a crash anywhere leaves nothing or everything.
5. Release the flow lease (the groups now count as produced). While the engine runs, the
   heartbeat thread renews the lease, so a short ``lease_ttl_s`` frees a dead generator's budget
   quickly without ever expiring a live one's mid-batch.

Every couple of seconds the loop also hands back the prompts that gone generators held (their
heartbeat stopped: SIGKILL, a lost node): the restarted replica has a new consumer name and
would otherwise wait ``visibility_timeout_s`` for them.

Failures: an engine error on a batch of several prompts retries each prompt alone once, so that
one poisonous prompt does not take its batch-mates down with it; prompts that still fail are
handed to ``StreamQueue.fail`` (released for another try, dead-lettered with the reason once
their deliveries are used up), and the loop backs off exponentially. A dead engine releases the
batch untouched and ends the process (a supervisor restarts it). SIGTERM lets the batch in
flight finish and publish; prompts read but not started are released.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from conspo import counters
from conspo.flow import FlowControl
from conspo.lineage import GENERATE, group_id_for
from conspo.prompting import PromptRejectedError, encode_prompt
from conspo.protocol import (
    Completion,
    LabeledGroup,
    MessageTooLargeError,
    Prompt,
    RolloutGroup,
    SamplingParams,
)
from conspo.queue import Commit, Delivery, StreamQueue, depths
from conspo.service import ServiceRuntime
from conspo.settings import GeneratorSettings, RunSettingsMismatchError, check_run_settings
from services.generator.backends.base import (
    Backend,
    BackendDeadError,
    BackendError,
    GenerationCancelledError,
)
from services.generator.metrics import GeneratorMetrics
from services.generator.prompting import group_params, group_seed
from services.generator.weights import WeightSync

log = logging.getLogger(__name__)


@dataclass
class _Job:
    delivery: Delivery[Prompt]
    prompt_ids: list[int]
    params: SamplingParams


class GeneratorLoop:
    def __init__(
        self,
        runtime: ServiceRuntime,
        settings: GeneratorSettings,
        backend: Backend,
        *,
        weights: WeightSync | None = None,
        metrics: GeneratorMetrics | None = None,
        served_version: int = 0,
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.backend = backend
        self.weights = weights
        self.metrics = metrics or GeneratorMetrics(runtime.registry)
        self.instance = runtime.instance
        client, keys = runtime.client, runtime.keys
        queue_opts = {
            "max_deliveries": settings.max_deliveries,
            "visibility_timeout_s": settings.visibility_timeout_s,
            "max_entry_bytes": settings.max_entry_bytes,
        }
        self.prompts: StreamQueue[Prompt] = StreamQueue(
            client, keys, "prompts", Prompt, **queue_opts
        )
        self.rollouts: StreamQueue[RolloutGroup] = StreamQueue(
            client, keys, "rollouts", RolloutGroup, **queue_opts
        )
        self.labeled: StreamQueue[LabeledGroup] = StreamQueue(
            client, keys, "labeled", LabeledGroup, **queue_opts
        )
        self.flow = FlowControl(
            client,
            keys,
            batch_groups=settings.batch_groups,
            max_staleness=settings.max_staleness,
            lease_ttl_s=settings.lease_ttl_s,
        )
        self.base_params = SamplingParams(
            n=settings.group_size,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            stop=list(settings.stop),
        )
        self.served_version = served_version
        self.metrics.serving(served_version)
        self._failures_in_a_row = 0
        self._last_dead_check = 0.0
        self._no_budget_since: float | None = None
        self._no_budget_logged = 0.0
        self._last_learner_check = -1e9
        self._told: set[str] = set()
        runtime.on_beat.append(lambda: self.flow.renew(self.instance))
        if weights is not None:  # a generator waiting for these weights wakes at once
            weights.on_staged(lambda: self.flow.notify("staged"))

    # -- running ----------------------------------------------------------------------------------
    def run(self, max_iterations: int | None = None) -> None:
        """Loop until the runtime is asked to stop (or ``max_iterations``, for tests)."""
        self.runtime.status = "running"
        done = 0
        try:
            while not self.runtime.stopping and (max_iterations is None or done < max_iterations):
                done += 1
                errors = self.runtime.error_count
                try:
                    self.step()
                    if self.runtime.error_count == errors:
                        self.runtime.recovered()
                except (BackendDeadError, RunSettingsMismatchError):
                    raise
                except redis.RedisError as exc:
                    self.runtime.error(f"redis error: {type(exc).__name__}: {exc}")
                    self._back_off()
                except Exception as exc:  # keep serving; the entries in hand are reclaimed later
                    log.exception("generator iteration failed")
                    self.runtime.error(f"iteration failed: {type(exc).__name__}: {exc}")
                    self._back_off()
                self._publish_info()
        finally:
            self.runtime.status = "stopping"
            try:
                self.flow.release(self.instance)
            except redis.RedisError as exc:
                log.warning("could not release the flow lease: %s", exc)

    def step(self) -> int:
        """One iteration; returns the number of groups published."""
        self.apply_staged_weights()
        self._trim_prompts()
        self._hand_back_from_the_dead()
        self._check_learner()
        waited = self._admission_wait()
        if waited is not None:
            reason, seconds = waited
            self.metrics.waited(reason, seconds)
            return 0
        want = self.settings.prompts_per_batch
        grant = self.flow.reserve(self.instance, want, self.served_version)
        if grant <= 0:
            t0 = time.monotonic()
            self.runtime.status = "waiting"
            self._say_why_no_budget(t0)
            # Weights staged since the top of this step: serve them now (the budget may
            # depend on them). Else sleep until the learner consumes or weights are staged
            # (``FlowControl.wait``), at most ``poll_ms``.
            if not self.apply_staged_weights() and not self.runtime.stopping:
                self.flow.wait(self.settings.poll_ms / 1000)
            self.metrics.waited("flow", time.monotonic() - t0)
            return 0
        self._no_budget_since = None
        self.runtime.status = "running"
        try:
            deliveries = self.prompts.read(
                self.instance, count=grant, block_ms=self.settings.poll_ms
            )
            if not deliveries:
                return 0
            return self.process(deliveries, capacity=want)
        finally:
            self.flow.release(self.instance)

    def _trim_prompts(self, every_s: float = 10.0) -> None:
        """Drop prompts every generator has acked (keeping the newest for lineage queries)."""
        now = time.monotonic()
        if now - getattr(self, "_last_trim", 0.0) < every_s:
            return
        self._last_trim = now
        self.prompts.trim(keep_last=self.settings.retain_entries)

    def _check_learner(self, every_s: float = 5.0) -> None:
        """The learner may (re)start with other run settings while we serve: an explicit
        disagreement, or a weight dtype we cannot follow without a restart, ends this
        generator (``RunSettingsMismatchError``, exit code 2) rather than generating under
        other limits or stalling on pushes it must refuse."""
        now = time.monotonic()
        if now - self._last_learner_check < every_s:
            return
        self._last_learner_check = now
        for change in check_run_settings(self.settings, self.runtime.store.announced_run()):
            if change not in self._told:
                self._told.add(change)
                log.warning("run settings changed: %s", change)

    def _say_why_no_budget(self, now: float, after_s: float = 10.0, every_s: float = 60.0) -> None:
        """Flow control can hold a generator back for long (the learner is busy, or waits for
        weights to reach us): say so in the log instead of going quiet."""
        if self._no_budget_since is None:
            self._no_budget_since = now
        waited = now - self._no_budget_since
        if waited < after_s or now - self._no_budget_logged < every_s:
            return
        self._no_budget_logged = now
        run = self.runtime.store.announced_run()  # the learner's numbers are the ones enforced
        if run is None and self.settings.batch_groups is None:
            log.info(
                "no generation budget for %.0f s: waiting for the learner to announce "
                "batch_groups and max_staleness (this generator follows the learner's)",
                waited,
            )
            return
        learner = self.runtime.store.policy_version()
        log.info(
            "no generation budget for %.0f s (serving v%d, learner at v%d, max_staleness %s): "
            "waiting for the learner to consume what is in flight%s",
            waited,
            self.served_version,
            learner,
            run.max_staleness if run is not None else self.settings.max_staleness,
            " or for newer weights" if learner - self.served_version > 0 else "",
        )

    def _hand_back_from_the_dead(self) -> None:
        every = self.settings.heartbeat_s
        now = time.monotonic()
        if now - self._last_dead_check < every:
            return
        self._last_dead_check = now
        self.runtime.hand_back_from_the_dead(self.prompts)

    # -- weights ----------------------------------------------------------------------------------
    def apply_staged_weights(self) -> bool:
        """Swap in the newest staged version (between engine calls only). Returns True if done."""
        if self.weights is None:
            return False
        staged = self.weights.take_staged()
        if staged is None:
            return False
        if staged.source == "checkpoint" and staged.version == self.served_version:
            log.debug("checkpoint v%d is already served", staged.version)
            return False
        t0 = time.perf_counter()
        try:
            self.weights.apply(staged)
        except BackendDeadError:
            raise
        except Exception as exc:  # a bad push must not kill the generator
            self.runtime.error(f"could not apply weights v{staged.version}: {exc}")
            return False
        seconds = time.perf_counter() - t0
        previous, self.served_version = self.served_version, staged.version
        try:
            self.weights.report_served(staged.version)
        except redis.RedisError as exc:
            log.warning("could not report served version: %s", exc)
        self.metrics.weights_applied(staged.version, seconds)
        log.info(
            "now serving v%d (was v%d; %s, applied in %.3fs)",
            staged.version,
            previous,
            staged.source,
            seconds,
        )
        return True

    # -- admission --------------------------------------------------------------------------------
    def downstream_backlog(self) -> int:
        """Groups waiting downstream: rollouts not yet verified + labeled not yet read.

        One pipelined round trip per check (``conspo.queue.depths``)."""
        rollouts, labeled = depths([self.rollouts, self.labeled])
        return rollouts.lag + rollouts.pending + labeled.lag

    def _admission_wait(self) -> tuple[str, float] | None:
        backlog = self.downstream_backlog()
        if backlog <= self.settings.max_backlog:
            return None
        t0 = time.monotonic()
        self.runtime.status = "waiting"
        log.debug("backlog %d > %d: waiting", backlog, self.settings.max_backlog)
        if not self.runtime.stopping:  # the learner's consumption also drains the backlog
            self.flow.wait(self.settings.poll_ms / 1000)
        return "backlog", time.monotonic() - t0

    # -- one batch --------------------------------------------------------------------------------
    def process(
        self, deliveries: Sequence[Delivery[Prompt]], *, capacity: int | None = None
    ) -> int:
        """Generate for and publish ``deliveries``; returns the number of groups published."""
        jobs = self._prepare(deliveries)
        if not jobs:
            return 0
        if self.runtime.stopping:
            self.prompts.release(*[j.delivery for j in jobs])
            return 0
        t0 = time.perf_counter()
        try:
            groups = self.backend.generate(
                [j.prompt_ids for j in jobs],
                [j.params for j in jobs],
                stop_event=self.runtime.stop_event,
            )
        except GenerationCancelledError:
            self.prompts.release(*[j.delivery for j in jobs])
            return 0
        except BackendDeadError as exc:
            self.prompts.release(*[j.delivery for j in jobs])
            self.runtime.error(f"engine is dead: {exc}")
            raise
        except Exception as exc:
            self.metrics.backend_errors.inc()
            return self._recover(jobs, exc)
        seconds = time.perf_counter() - t0
        self._failures_in_a_row = 0
        return self._publish(jobs, groups, seconds, capacity or len(jobs))

    def _prepare(self, deliveries: Sequence[Delivery[Prompt]]) -> list[_Job]:
        pipe = self.runtime.client.pipeline(transaction=False)
        for d in deliveries:
            pipe.exists(self.runtime.keys.done(GENERATE, d.entry_id))
        already = pipe.execute()
        jobs: list[_Job] = []
        tokenizer, max_len = self.backend.tokenizer, self.backend.max_model_len
        for d, done in zip(deliveries, already, strict=True):
            if done:
                self.prompts.ack(d)
                self.metrics.skipped.inc()
                log.info("prompt %s was already generated for; acked", d.entry_id)
                continue
            try:
                ids = encode_prompt(d.message, tokenizer, max_len)
            except PromptRejectedError as exc:
                self._dead_letter(d, str(exc))
                continue
            params = group_params(
                self.base_params,
                prompt_len=len(ids),
                max_model_len=max_len,
                seed=group_seed(self.settings.seed, d.entry_id),
            )
            jobs.append(_Job(d, ids, params))
        return jobs

    def _publish(
        self, jobs: list[_Job], groups: list[list[Completion]], seconds: float, capacity: int
    ) -> int:
        if len(groups) != len(jobs):
            raise BackendError(f"engine returned {len(groups)} groups for {len(jobs)} prompts")
        published = completions = tokens = 0
        commits: list[Commit] = []
        sizes: list[tuple[int, int]] = []
        for job, completions_of in zip(jobs, groups, strict=True):
            d = job.delivery
            group = RolloutGroup(
                group_id=group_id_for(d.entry_id),
                prompt=d.message,
                prompt_token_ids=job.prompt_ids,
                completions=completions_of,
                policy_version=self.served_version,
                sampling=job.params,
                generator_id=self.instance,
                gen_seconds=seconds,
            )
            n_tokens = sum(len(c.token_ids) for c in completions_of)
            commits.append(
                Commit(
                    d,
                    stage=GENERATE,
                    item=d.entry_id,
                    outputs=[(self.rollouts, group, group.group_id)],
                    counters={
                        counters.GENERATOR_GROUPS: 1,
                        counters.GENERATOR_COMPLETIONS: len(completions_of),
                        counters.GENERATOR_TOKENS: n_tokens,
                    },
                )
            )
            sizes.append((len(completions_of), n_tokens))
        # One round trip for the batch; each commit stays atomic on its own.
        try:
            results = self.prompts.commit_many(commits)
        except MessageTooLargeError:
            results = [self._commit_alone(c) for c in commits]
        for c, (n_completions, n_tokens), result in zip(commits, sizes, results, strict=True):
            if result is None:
                continue
            if result[1]:
                published += 1
                completions += n_completions
                tokens += n_tokens
            else:
                self.metrics.skipped.inc()
                log.info("group for prompt %s was published by someone else first", c.item)
        self.metrics.batch(
            prompts=len(jobs),
            capacity=capacity,
            groups=published,
            completions=completions,
            tokens=tokens,
            seconds=seconds,
        )
        log.debug("published %d groups, %d tokens in %.3fs", published, tokens, seconds)
        return published

    def _commit_alone(self, c: Commit) -> tuple[str, bool] | None:
        try:
            return self.prompts.commit_many([c])[0]
        except MessageTooLargeError as exc:
            assert c.delivery is not None
            self._dead_letter(c.delivery, f"rollout group too large to publish: {exc}")
            return None

    def _recover(self, jobs: list[_Job], exc: Exception) -> int:
        """A batch failed: isolate the culprit(s) by retrying each prompt alone, once."""
        reason = f"engine error: {type(exc).__name__}: {exc}"
        log.warning("batch of %d failed (%s)", len(jobs), reason)
        published = 0
        failed: list[tuple[_Job, str]] = []
        if len(jobs) == 1:
            failed.append((jobs[0], reason))
        else:
            for job in jobs:
                if self.runtime.stopping:
                    self.prompts.release(job.delivery)
                    continue
                t0 = time.perf_counter()
                try:
                    groups = self.backend.generate(
                        [job.prompt_ids], [job.params], stop_event=self.runtime.stop_event
                    )
                except GenerationCancelledError:
                    self.prompts.release(job.delivery)
                    continue
                except BackendDeadError:
                    self.prompts.release(*[j.delivery for j, _ in failed], job.delivery)
                    raise
                except Exception as alone:
                    failed.append((job, f"engine error: {type(alone).__name__}: {alone}"))
                    continue
                published += self._publish([job], groups, time.perf_counter() - t0, 1)
        for job, why in failed:
            if self.prompts.fail(job.delivery, why):
                self.metrics.dead_lettered.inc()
        if failed:
            self._failures_in_a_row += 1
            self.runtime.error(f"{len(failed)} prompt(s) failed: {failed[0][1]}")
            self._back_off()
        return published

    def _dead_letter(self, delivery: Delivery[Prompt], reason: str) -> None:
        self.prompts.fail(delivery, reason, retry=False)
        self.metrics.dead_lettered.inc()

    def _back_off(self) -> None:
        self._failures_in_a_row = max(self._failures_in_a_row, 1)
        delay = min(
            self.settings.backoff_max_s,
            self.settings.backoff_s * 2 ** (self._failures_in_a_row - 1),
        )
        self.runtime.sleep(delay)

    def _publish_info(self) -> None:
        info = self.metrics.heartbeat_info()
        info["backend"] = self.backend.name
        if self.weights is not None and self.weights.last_error:
            info["weight_sync_error"] = self.weights.last_error[:200]
        self.runtime.info.update(info)
