"""Rank 0's learner service: the stream, the ack window, flow control, pushes, metrics, commits.

Exactly-once training across crashes rests on one ordering rule: a stream entry is acked, and
its LEARN marker written, only after a checkpoint that covers its effect is committed. Until
then it stays pending under the learner's stable consumer name. So at any crash point:

- before a checkpoint commits: its entries are pending and the newest checkpoint predates them;
  the restart replays them in stream order from that checkpoint's exact state (weights,
  optimizer, scheduler, version, margin position) and takes the same decisions;
- between the commit and the ack: the checkpoint lists the entries (``records``); the restart
  acks and marks them without training;
- after the ack: nothing to do.

``FlowControl``'s consumed counter follows the same timeline: skipped and dropped groups count
as soon as they are decided, trained ones when their step completes, and a restart resets the
counter to the checkpoint's total (``set_consumed``) before replaying.

Skipped and dropped groups do not wait for a checkpoint: every ``waiting_after_s`` the service
releases them through the ledger beside the checkpoints (``checkpoint.Ledger``: written first,
then mark and ack; a restart adds it to the checkpoint it extends and acks its entries as
covered), so a run whose rewards are all equal still acks and trims its stream. While no step
happens the service also counts them as they arrive and, after ``waiting_after_s``, publishes
and logs why it waits (``services.learner.waiting``); the next step clears that.

The service runs on rank 0 only and never runs a collective: the training loop
(``services.learner.loop``) runs those on every rank and calls the service between them with
the loop's ``Progress``; the service answers each iteration with a ``StepCommand``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import torch
from torch import nn

from conspo import counters
from conspo.depths import stream_depth
from conspo.flow import FlowControl
from conspo.lineage import LEARN, learn_marker
from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.settings import LearnerSettings, RunSettings
from conspo.state import RunStore, Waiting
from conspo.weight_sync import PushReport
from services.learner.batcher import SKIPPED, Batch, Batcher, Decided
from services.learner.checkpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointState,
    EntryRecord,
    Ledger,
)
from services.learner.command import Progress, StepCommand
from services.learner.distributed import DistContext
from services.learner.metrics import Metrics, step_record
from services.learner.step import StepStats
from services.learner.sync import WeightPush, parameter_list
from services.learner.tracking import build_trackers
from services.learner.waiting import WaitStats

log = logging.getLogger(__name__)

COUNTERS = counters.LEARNER_CHECKPOINTED
FullState = dict[str, torch.Tensor] | None


class LearnerService:
    """Everything of the learner that talks to Redis or the disk, on rank 0."""

    def __init__(
        self,
        settings: LearnerSettings,
        ctx: DistContext,
        *,
        client: redis.Redis,
        registry: Any = None,
        stop_requested: Callable[[], bool] | None = None,
    ) -> None:
        """``stop_requested`` returns True once SIGTERM arrived; ``registry`` is Prometheus'."""
        from prometheus_client import CollectorRegistry

        s = self.s = settings
        self.ctx = ctx
        self.client = client
        self.registry = registry or CollectorRegistry()
        self.stop_requested = stop_requested or (lambda: False)
        self.ckpts = CheckpointManager(s.run_dir / "checkpoints", s.keep_checkpoints)
        self.store = RunStore(client, s.keys)
        self.queue: StreamQueue[LabeledGroup] = StreamQueue(
            client,
            s.keys,
            "labeled",
            LabeledGroup,
            max_deliveries=s.max_deliveries,
            visibility_timeout_s=s.visibility_timeout_s,
            max_entry_bytes=s.max_entry_bytes,
        )
        self.consumer = s.consumer or f"learner-{s.run}-rank0"
        self.batcher = Batcher(
            self.queue,
            self.consumer,
            batch_groups=s.batch_groups,
            max_staleness=s.max_staleness,
            skip_uninformative=s.skip_uninformative,
            block_ms=s.block_ms,
        )
        self.flow = FlowControl(
            client, s.keys, batch_groups=s.batch_groups, max_staleness=s.max_staleness
        )
        self.push_dtype: torch.dtype = getattr(torch, s.weight_sync_dtype)
        # Commit side: what the next checkpoint records.
        self.seq = 0
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.consumed_total = 0
        self.window: list[Decided] = []  # decided since the last acked checkpoint
        self.released = Ledger(base_seq=-1)  # released since that checkpoint
        self.last_ckpt_path: str | None = None
        self.last_push_version = -1
        # Assembling: what the current wait has seen and said.
        self.at = Progress(0, 0, s.total_steps)  # the loop's position, as last told
        self.wait = WaitStats()
        self._batch = Batch()
        self._unflushed: dict[str, int] = {}
        self._duplicates_flushed = 0
        self._last_release = self._last_explained = self._last_logged = 0.0
        self._next_idle_push = 0.0
        self._layout_hash: str | None = None
        self._waiting_code: str | None = None
        # Set by ``start``, once the loop has built the model.
        self.model: nn.Module | None = None
        self.push: WeightPush | None = None
        self.metrics: Metrics | None = None
        self.evaluator: Any = None
        self._eval_base: Path | None = None
        self._eval_model: nn.Module | None = None

    # -- set-up -----------------------------------------------------------------------------------
    def find_checkpoint(self) -> Checkpoint | None:
        self.ckpts.cleanup_partial()
        ckpt = self.ckpts.latest()
        if ckpt:
            log.info("resuming from %s (step %d)", ckpt.path, ckpt.state.step)
        return ckpt

    def start(
        self,
        ckpt: Checkpoint | None,
        model: nn.Module,
        tokenizer: Any,
        progress: Progress,
        *,
        base_path: Path,
    ) -> None:
        """Resume the commit side from ``ckpt`` (and its ledger), ack what it covers, queue the
        rest for replay, and open metrics, pushes and evaluation."""
        s = self.s
        self.model, self.at, self._eval_base = model, progress, base_path
        self.store.announce_run(RunSettings.of(s))
        if ckpt:
            self.seq = ckpt.state.seq + 1
            self.released = Ledger(base_seq=ckpt.state.seq)
            self.last_ckpt_path = str(ckpt.model_dir)
            self.consumed_total = ckpt.state.consumed_total
            self.counters.update({k: v for k, v in ckpt.state.counters.items() if k in COUNTERS})
        ledger = self.ckpts.read_ledger(self.released.base_seq)
        if ledger is not None:
            self.released = ledger.model_copy(update={"records": []})
            self.consumed_total += ledger.consumed
            for k, v in ledger.counters.items():
                if k in COUNTERS:
                    self.counters[k] += v
            log.info("release ledger: %d groups released since the checkpoint", ledger.consumed)
        self.flow.set_consumed(self.consumed_total)
        self.client.hset(
            s.keys.counters, mapping={counters.learner(k): v for k, v in self.counters.items()}
        )
        self._recover_pending(ckpt, ledger)
        self.store.clear_waiting()
        self.store.set_fields(
            step=progress.step,
            policy_version=progress.version,
            status="running",
            learner=self.consumer,
        )
        self.metrics = Metrics(
            s.run_dir,
            self.registry,
            self.store,
            total_steps=s.total_steps,
            progress_bar=s.progress_bar,
            plot_every=s.plot_every,
            trackers=build_trackers(s, progress.step),
        )
        self.metrics.resume(progress.step)
        self.push = WeightPush(
            self.client,
            s.keys,
            host=s.weight_sync_host,
            port=s.weight_sync_port,
            backend=s.weight_sync_backend,
            timeout_s=s.weight_sync_timeout_s,
            member_ttl_s=s.weight_sync_member_ttl_s,
            bucket_bytes=s.weight_sync_bucket_mb * 1024 * 1024,
            device=self.ctx.device,
            colocated=s.colocated_generator,
            join_timeout_s=s.weight_sync_join_timeout_s,
        )
        if s.eval_every > 0:
            from conspo.evaluation import Evaluator, load_eval_set
            from conspo.models.tiny import context_length

            eval_set = load_eval_set(
                s.eval_set,
                s.eval_samples,
                fmt=s.eval_prompt_format,
                chat_template=bool(getattr(tokenizer, "chat_template", None)),
            )
            self.evaluator = Evaluator(
                tokenizer,
                eval_set,
                k=s.eval_k,
                temperature=s.eval_temperature,
                top_p=s.eval_top_p,
                max_tokens=s.eval_max_tokens,
                seed=s.seed,
                max_model_len=context_length(model, tokenizer),
            )

    def _recover_pending(self, ckpt: Checkpoint | None, ledger: Ledger | None) -> None:
        """Ack what the newest checkpoint (and its ledger) covers; replay the rest of our
        pending entries."""
        pending = self.queue.read_own_pending(self.consumer)
        records = [*(ckpt.state.records if ckpt else []), *(ledger.records if ledger else [])]
        recorded = {r.entry_id: r for r in records}
        covered = [(d, recorded[d.entry_id].group_id, recorded[d.entry_id].marker)
                   for d in pending if d.entry_id in recorded]  # fmt: skip
        if covered:
            self.queue.mark_and_ack(covered, stage=LEARN)
            log.info("acked %d entries the checkpoint already covers", len(covered))
        replay = [d for d in pending if d.entry_id not in recorded]
        if replay:
            log.info("replaying %d pending entries in stream order", len(replay))
        self.batcher.replay(replay)

    # -- what next --------------------------------------------------------------------------------
    def next_command(self, progress: Progress) -> StepCommand:
        """Finish, stop, or assemble the next batch (blocking until it is complete)."""
        s = self.s
        self.at = progress
        if progress.step >= s.total_steps:
            return StepCommand("finish")
        if self.stop_requested():
            return StepCommand("stop")
        self.wait = WaitStats()
        batch = self.batcher.next_batch(
            progress.version,
            should_stop=self.stop_requested,
            wait_timeout_s=s.wait_timeout_s,
            renew_every_s=s.visibility_timeout_s / 3,
            on_decided=self._on_decided,
            on_wait=self._while_assembling,
        )
        self._flush_counts()
        if not batch.complete:
            return StepCommand("stop")
        self._batch = batch
        return StepCommand.train(batch.groups, batch.wait_seconds)

    # -- skipped and dropped groups: counted, explained and released as they arrive -------------
    def _on_decided(self, decided: Decided) -> None:
        """A skipped or dropped group: consumed and counted now, acked by the next release."""
        self.window.append(decided)
        self.flow.consumed(1)
        self.consumed_total += 1
        kind = "skipped" if decided.marker == SKIPPED else "dropped"
        self.counters[f"groups_{kind}"] += 1
        name = counters.learner(f"groups_{kind}")
        self._unflushed[name] = self._unflushed.get(name, 0) + 1
        assert self.metrics is not None
        self.metrics.groups_seen(kind, 1)
        self.wait.saw(decided)

    def _flush_counts(self) -> None:
        duplicates = self.batcher.duplicates_total - self._duplicates_flushed
        if duplicates:
            self._duplicates_flushed += duplicates
            self.counters["groups_duplicate"] += duplicates
            self._unflushed[counters.LEARNER_GROUPS_DUPLICATE] = duplicates
            assert self.metrics is not None
            self.metrics.groups_seen("duplicate", duplicates)
        if self._unflushed:
            self.store.incr(self._unflushed)
            self._unflushed = {}

    def _while_assembling(self, in_hand: int, idle_s: float) -> None:
        """Between reads: publish the counts, release, and say why we wait (once it lasts)."""
        self._flush_counts()
        now = time.monotonic()
        after = self.s.waiting_after_s
        if now - self._last_release >= after:
            self._last_release = now
            self._release()
        if self.wait.elapsed >= after and now - self._last_explained >= 1.0:
            self._last_explained = now
            self._explain(in_hand, idle_s)
        self._push_to_newcomers()

    def _push_to_newcomers(self) -> None:
        """A generator that joined (or restarted) while no step happens gets the current
        weights now, not after the next step, which may need its data first. Single-process
        learners only: under FSDP the full weights are a collective of every rank."""
        now = time.monotonic()
        if self.ctx.enabled or self.push is None or now < self._next_idle_push:
            return
        self._next_idle_push = now + 1.0
        if self._layout_hash is None:
            from conspo.weight_sync import layout_of

            params = parameter_list(self.model, None, dtype=self.push_dtype)
            self._layout_hash = layout_of(params).hash
        missing = self.push.missing_members(self._layout_hash)
        if not missing:
            return
        log.info("pushing v%d to %s (joined while no step happens)", self.at.version, missing)
        if not self.push_weights(self.at, None).ok:
            self._next_idle_push = now + self.s.waiting_after_s  # not every second

    def _explain(self, in_hand: int, idle_s: float) -> None:
        s = self.s
        code, reason = self.wait.explain(
            in_hand=in_hand,
            batch_groups=s.batch_groups,
            idle_s=idle_s,
            quiet_after_s=s.waiting_after_s,
            version=self.at.version,
            max_staleness=s.max_staleness,
            upstream=self._upstream,
        )
        self.store.set_waiting(
            Waiting(service="learner", code=code, reason=reason, since=self.wait.since)
        )
        now = time.monotonic()
        if code != self._waiting_code or now - self._last_logged >= max(60.0, s.waiting_after_s):
            log.info("no step for %.0f s (%s): %s", self.wait.elapsed, code, reason)
            self._waiting_code, self._last_logged = code, now

    def _upstream(self) -> str:
        """What the queues before us hold and who is alive to work them."""
        prompts = stream_depth(self.client, self.s.keys, "prompts")
        rollouts = stream_depth(self.client, self.s.keys, "rollouts")
        horizon = 3 * self.s.heartbeat_s
        generators = len(self.store.alive("generator", horizon))
        verifiers = len(self.store.alive("verifier", horizon))
        text = (
            f"prompts: {prompts.lag:,} queued, {prompts.pending:,} being generated; rollouts: "
            f"{rollouts.lag:,} queued, {rollouts.pending:,} being verified; alive: "
            f"{generators} generator(s), {verifiers} verifier(s)"
        )
        if prompts.outstanding + rollouts.outstanding == 0:
            text += "; nothing is queued upstream: submit prompts or a dataset"
        return text

    def _release(self) -> None:
        """Ack the skipped and dropped groups of the window without a checkpoint: the ledger
        first (a crash before the ack leaves them covered), then one mark-and-ack."""
        items = [d for d in self.window if not d.marker.startswith("trained")]
        if not items:
            return
        skipped = sum(d.marker == SKIPPED for d in items)
        counts = dict(self.released.counters)
        for name, n in (("groups_skipped", skipped), ("groups_dropped", len(items) - skipped)):
            counts[name] = counts.get(name, 0) + n
        ledger = Ledger(
            base_seq=self.released.base_seq,
            consumed=self.released.consumed + len(items),
            counters=counts,
            records=[EntryRecord(entry_id=d.delivery.entry_id, group_id=d.group_id,
                                 marker=d.marker) for d in items],
        )  # fmt: skip
        try:
            self.ckpts.write_ledger(ledger)
        except OSError as exc:  # disk trouble: they stay pending for the next checkpoint
            log.error("could not write the release ledger %s: %s", self.ckpts.ledger_path, exc)
            return
        try:
            self.queue.mark_and_ack(
                [(d.delivery, d.group_id, d.marker) for d in items], stage=LEARN
            )
        except redis.RedisError as exc:
            log.error(
                "could not release %d groups (kept for the next release): %s", len(items), exc
            )
            return
        self.released = ledger.model_copy(update={"records": []})
        released = {id(d) for d in items}
        self.window = [d for d in self.window if id(d) not in released]
        self.batcher.release_held([d.delivery.entry_id for d in items], [d.group_id for d in items])
        log.debug("released %d skipped/dropped groups", len(items))
        self._trim()

    def _trim(self) -> None:
        # Acked entries are now safe to drop; keep the newest ones for lineage queries.
        try:
            self.queue.trim(keep_last=self.s.retain_entries)
        except redis.RedisError as exc:
            log.warning("could not trim %s: %s", self.queue.key, exc)

    # -- after a step -----------------------------------------------------------------------------
    def commit_step(self, progress: Progress, trained: int) -> None:
        """The step that produced ``progress`` trained ``trained`` groups of the last batch:
        into the window (acked by the checkpoint that covers them), counted, consumed."""
        self.at = progress
        marker = learn_marker("trained", progress.step)
        self.window.extend(Decided(d, d.message.group_id, marker) for d in self._batch.train)
        self.counters["steps"] += 1
        self.counters["groups_trained"] += trained
        self.store.set_fields(step=progress.step, policy_version=progress.version)
        if self._waiting_code is not None:
            self.store.clear_waiting()
            self._waiting_code = None
        self.flow.consumed(trained)
        self.consumed_total += trained
        self.store.incr({counters.LEARNER_STEPS: 1, counters.LEARNER_GROUPS_TRAINED: trained})
        assert self.metrics is not None
        self.metrics.groups_seen("trained", trained)

    @property
    def uncommitted(self) -> bool:
        """Decided entries no checkpoint covers yet."""
        return bool(self.window)

    def commit_checkpoint(
        self, progress: Progress, write_model: Callable[[Path], None], blobs: dict[str, Any]
    ) -> None:
        """Save a checkpoint recording the window, then mark and ack what it covers."""
        state = CheckpointState(
            seq=self.seq,
            step=progress.step,
            version=progress.version,
            total_steps=progress.margin_total,
            consumed_total=self.consumed_total,
            counters=dict(self.counters),
            records=[
                EntryRecord(entry_id=d.delivery.entry_id, group_id=d.group_id, marker=d.marker)
                for d in self.window
            ],
            world_size=self.ctx.world_size,
            objective=self.s.objective,
        )
        path = self.ckpts.save(state, write_model, blobs)
        self.seq += 1
        self.released = Ledger(base_seq=state.seq)  # the checkpoint absorbed the ledger
        self.ckpts.drop_ledger()
        self.last_ckpt_path = str(path / "model")
        log.info("checkpoint %s (%d entries recorded)", path.name, len(self.window))
        self._ack_window()

    def _ack_window(self) -> None:
        """Mark and ack what the committed checkpoint covers; on failure the entries stay in
        the window and are recorded again by the next checkpoint (never replayed)."""
        if not self.window:
            return
        items = [(d.delivery, d.group_id, d.marker) for d in self.window]
        try:
            self.queue.mark_and_ack(items, stage=LEARN)
        except redis.RedisError as exc:
            log.error(
                "could not ack %d entries (kept for the next checkpoint): %s", len(items), exc
            )
            return
        self.batcher.release_held(
            [d.delivery.entry_id for d in self.window], [d.group_id for d in self.window]
        )
        self.window = []
        self._trim()

    def push_weights(self, progress: Progress, full: FullState) -> PushReport:
        """Push the policy (``full``: the gathered weights under FSDP) as ``progress.version``."""
        assert self.push is not None
        outcome = self.push.push(
            parameter_list(self.model, full, dtype=self.push_dtype),
            version=progress.version,
            step=progress.step,
            checkpoint_path=self.last_ckpt_path,
        )
        self.last_push_version = progress.version
        if not outcome.ok:
            self.store.incr({counters.LEARNER_PUSH_FAILURES: 1})
        self.store.set_fields(last_push_version=progress.version, last_push_ok=int(outcome.ok))
        return outcome

    def evaluate(self, step: int, full: FullState) -> float:
        """Held-out evaluation of the policy at ``step``; the seconds it took (0: none)."""
        if self.evaluator is None:
            return 0.0
        record = self.evaluator.run(self._eval_target(full), step)
        assert self.metrics is not None
        self.metrics.eval(record)
        return float(record["eval_s"])

    def _eval_target(self, full: FullState) -> nn.Module:
        if not self.ctx.enabled:
            assert self.model is not None
            return self.model
        if self._eval_model is None:  # under FSDP: an unsharded copy that takes the gathered
            from conspo.models.tiny import load_policy

            self._eval_model, _ = load_policy(self._eval_base, self.ctx.device, torch.float32)
        assert full is not None
        self._eval_model.load_state_dict(full, strict=False)
        return self._eval_model

    def report(
        self,
        progress: Progress,
        stats: StepStats,
        timings: dict[str, float],
        push_ok: bool | None,
    ) -> None:
        assert self.metrics is not None
        record = step_record(progress.step, progress.version, self._batch, stats, timings)
        record["push_ok"] = push_ok
        self.metrics.train({k: v for k, v in record.items() if v is not None})

    # -- the end ----------------------------------------------------------------------------------
    def finish(self, progress: Progress, status: str, full: FullState) -> None:
        """The final push (a finished run whose last version was not pushed) and the state."""
        if status == "finished" and self.last_push_version != progress.version:
            self.push_weights(progress, full)
        self.store.clear_waiting()
        self.store.set_fields(step=progress.step, policy_version=progress.version, status=status)
        log.info("learner %s at step %d (version %d)", status, progress.step, progress.version)

    def close(self) -> None:
        if self.push is not None:
            self.push.close()
        if self.metrics is not None:
            self.metrics.close()
