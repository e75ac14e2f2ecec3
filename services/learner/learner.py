"""The learner's control loop: assemble, step, commit (checkpoint, then ack), push, evaluate.

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

Skipped and dropped groups do not wait for a checkpoint: every ``waiting_after_s`` the learner
releases them through the ledger beside the checkpoints (``checkpoint.Ledger``: written first,
then mark and ack; a restart adds it to the checkpoint it extends and acks its entries as
covered), so a run whose rewards are all equal still acks and trims its stream. While no step
happens the learner also counts them as they arrive and, after ``waiting_after_s``, publishes
and logs why it waits (``services.learner.waiting``); the next step clears that.

Ranks: rank 0 owns Redis, the batcher, metrics, checkpoints and pushes; it broadcasts one command
per iteration (train these groups / stop / finish) and every rank runs the same step, gathers
and saves on the same schedule (a pure function of the step counter), so collectives line up.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import redis
import torch

from conspo import counters
from conspo.depths import stream_depth
from conspo.flow import FlowControl
from conspo.lineage import LEARN, learn_marker
from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.settings import LearnerSettings, RunSettings
from conspo.state import Waiting
from services.learner.batcher import SKIPPED, Batcher, Decided
from services.learner.checkpoint import (
    Checkpoint,
    CheckpointManager,
    CheckpointState,
    EntryRecord,
    Ledger,
    capture_rng,
    restore_rng,
)
from services.learner.data import TrainGroup
from services.learner.distributed import (
    DistContext,
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    shard_model,
)
from services.learner.metrics import Metrics, step_record
from services.learner.step import ObjectivePlan, StepStats, TrainConfig, Trainer
from services.learner.sync import WeightPush, parameter_list
from services.learner.tracking import build_trackers
from services.learner.waiting import WaitStats

log = logging.getLogger(__name__)

COUNTERS = counters.LEARNER_CHECKPOINTED


def configure_torch(settings: LearnerSettings) -> None:
    """Thread count and deterministic kernels: exact resume needs both fixed."""
    if settings.num_threads > 0:
        torch.set_num_threads(settings.num_threads)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def default_model_path() -> Path:
    from conspo.models import default_checkpoint

    return Path(default_checkpoint())


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (transformers >= 5 renamed the API)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


class Learner:
    def __init__(
        self,
        settings: LearnerSettings,
        ctx: DistContext,
        *,
        client: redis.Redis | None = None,
        registry: Any = None,
        stop_requested: Any = None,
    ) -> None:
        """``client``/``registry``/``stop_requested`` are rank 0's (None on other ranks);
        ``stop_requested`` is a callable returning True once SIGTERM arrived."""
        self.s = settings
        self.ctx = ctx
        self.client = client
        self.stop_requested = stop_requested or (lambda: False)
        configure_torch(settings)
        self.model_path = Path(settings.model_path) if settings.model_path else None
        self.ckpts = CheckpointManager(settings.run_dir / "checkpoints", settings.keep_checkpoints)
        self.config = TrainConfig.from_settings(settings)
        ckpt = self._find_checkpoint()
        self._build_model(ckpt)
        self.step = ckpt.state.step if ckpt else 0
        self.version = ckpt.state.version if ckpt else 0
        self.seq = ckpt.state.seq + 1 if ckpt else 0
        self.margin_total = ckpt.state.total_steps if ckpt else settings.total_steps
        if ckpt and ckpt.state.total_steps != settings.total_steps:
            log.warning(
                "total_steps changed from %d to %d: the margin schedule keeps the checkpoint's "
                "horizon (%d); training stops at %d",
                ckpt.state.total_steps,
                settings.total_steps,
                self.margin_total,
                settings.total_steps,
            )
        self.last_ckpt_step = self.step  # nothing to save before the first step
        self.last_ckpt_path: str | None = str(ckpt.model_dir) if ckpt else None
        self.last_push_version = -1
        self.last_eval_step = -1
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.consumed_total = 0
        self.window: list[Decided] = []  # decided since the last acked checkpoint
        self.released = Ledger(base_seq=ckpt.state.seq if ckpt else -1)  # since that checkpoint
        self.wait = WaitStats()
        self._unflushed: dict[str, int] = {}
        self._duplicates_flushed = 0
        self._last_release = self._last_explained = self._last_logged = 0.0
        self._next_idle_push = 0.0
        self._layout_hash: str | None = None
        self._waiting_code: str | None = None
        self.push: WeightPush | None = None
        self.metrics: Metrics | None = None
        self.evaluator = None
        self._eval_model = None
        if ctx.is_main:
            self._setup_main(ckpt, registry)

    # -- set-up -----------------------------------------------------------------------------------
    def _find_checkpoint(self) -> Checkpoint | None:
        ckpt = None
        if self.ctx.is_main:
            self.ckpts.cleanup_partial()
            ckpt = self.ckpts.latest()
            if ckpt:
                log.info("resuming from %s (step %d)", ckpt.path, ckpt.state.step)
        return self.ctx.broadcast_object(ckpt)

    def _build_model(self, ckpt: Checkpoint | None) -> None:
        from conspo.models.tiny import load_policy

        s, ctx = self.s, self.ctx
        base = self.model_path or default_model_path()
        self.base_path = base
        # World size 1 loads the checkpoint's weights directly; FSDP2 loads the base on every
        # rank and receives the checkpoint's tensors from rank 0 (no shared filesystem needed).
        first = ckpt.model_dir if (ckpt and not ctx.enabled) else base
        self.model, self.tokenizer = load_policy(first, ctx.device, torch.float32)
        if s.grad_checkpointing:
            _enable_activation_checkpointing(self.model)
        shard_model(self.model, ctx)
        if ckpt and ctx.enabled:
            state = {}
            if ctx.is_main:
                from safetensors.torch import load_file

                for f in sorted(ckpt.model_dir.glob("*.safetensors")):
                    state.update(load_file(f))
            load_full_model_state(self.model, state, ctx)
        ref = None
        if ObjectivePlan.of(self.config).needs_reference:
            ref_path = Path(s.ref_model_path) if s.ref_model_path else base
            ref, _ = load_policy(ref_path, ctx.device, torch.float32)
            ref.requires_grad_(False)
            shard_model(ref, ctx)
            log.info("frozen reference model from %s", ref_path)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        first_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.trainer = Trainer(
            self.config,
            self.model,
            ctx,
            ref_model=ref,
            pad_id=int(pad),
            dummy_ids=(int(first_id or 0), int(tok.eos_token_id or 0)),
        )
        if ckpt:
            optim = ckpt.load_blob("optimizer") if ctx.is_main else {}
            load_full_optimizer_state(self.model, self.trainer.optimizer, optim, ctx)
            sched = ctx.broadcast_object(ckpt.load_blob("scheduler") if ctx.is_main else None)
            self.trainer.scheduler.load_state_dict(sched)
            restore_rng(ctx.broadcast_object(ckpt.load_blob("rng") if ctx.is_main else None))

    def _setup_main(self, ckpt: Checkpoint | None, registry: Any) -> None:
        from prometheus_client import CollectorRegistry

        from conspo.state import RunStore

        s = self.s
        assert self.client is not None, "rank 0 needs a Redis client"
        self.store = RunStore(self.client, s.keys)
        self.queue: StreamQueue[LabeledGroup] = StreamQueue(
            self.client,
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
            self.client, s.keys, batch_groups=s.batch_groups, max_staleness=s.max_staleness
        )
        self.store.announce_run(RunSettings.of(s))
        if ckpt:
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
            step=self.step, policy_version=self.version, status="running", learner=self.consumer
        )
        self.metrics = Metrics(
            s.run_dir,
            registry or CollectorRegistry(),
            self.store,
            total_steps=s.total_steps,
            progress_bar=s.progress_bar,
            plot_every=s.plot_every,
            trackers=build_trackers(s, self.step),
        )
        self.metrics.resume(self.step)
        self.push_dtype: torch.dtype = getattr(torch, s.weight_sync_dtype)
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
                chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            )
            self.evaluator = Evaluator(
                self.tokenizer,
                eval_set,
                k=s.eval_k,
                temperature=s.eval_temperature,
                top_p=s.eval_top_p,
                max_tokens=s.eval_max_tokens,
                seed=s.seed,
                max_model_len=context_length(self.model, self.tokenizer),
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

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> str:
        """Train until total_steps (``finished``), a stop request or the data timeout
        (``idle``). Every rank calls this; the return value is rank 0's verdict."""
        s = self.s
        if self.step == 0 and s.eval_every > 0 and s.eval_at_start:
            self._maybe_eval(force=True)
        if self.step > 0:  # announce the resumed version and its checkpoint
            full = self._gather_if_needed(force=True)
            if self.ctx.is_main:
                self._push_weights(full)
        while True:
            command = self._next_command() if self.ctx.is_main else None
            command = self.ctx.broadcast_object(command)
            if command[0] != "train":
                return self._finish(command[0])
            self._train(command[1], command[2])

    def _next_command(self) -> tuple:
        s = self.s
        if self.step >= s.total_steps:
            return ("finish",)
        if self.stop_requested():
            return ("stop",)
        self.wait = WaitStats()
        batch = self.batcher.next_batch(
            self.version,
            should_stop=self.stop_requested,
            wait_timeout_s=s.wait_timeout_s,
            renew_every_s=s.visibility_timeout_s / 3,
            on_decided=self._on_decided,
            on_wait=self._while_assembling,
        )
        self._flush_counts()
        if not batch.complete:
            return ("stop",)
        self._batch = batch
        return ("train", batch.groups, batch.wait_seconds)

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
        log.info("pushing v%d to %s (joined while no step happens)", self.version, missing)
        if not self._push_weights(None).ok:
            self._next_idle_push = now + self.s.waiting_after_s  # not every second

    def _explain(self, in_hand: int, idle_s: float) -> None:
        s = self.s
        code, reason = self.wait.explain(
            in_hand=in_hand,
            batch_groups=s.batch_groups,
            idle_s=idle_s,
            quiet_after_s=s.waiting_after_s,
            version=self.version,
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
        assert self.client is not None
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
        counters = dict(self.released.counters)
        for name, n in (("groups_skipped", skipped), ("groups_dropped", len(items) - skipped)):
            counters[name] = counters.get(name, 0) + n
        ledger = Ledger(
            base_seq=self.released.base_seq,
            consumed=self.released.consumed + len(items),
            counters=counters,
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

    def _train(self, groups: list[TrainGroup], wait_s: float) -> None:
        stats = self.trainer.step(groups, self.step, self.margin_total)
        self.step += 1
        self.version += 1
        ckpt_s = push_s = eval_s = 0.0
        push_ok = None
        if self.ctx.is_main:
            self._commit_step(groups)
        full = self._gather_if_needed()
        if self.step % self.s.checkpoint_every == 0:
            ckpt_s = self._checkpoint(full)
        if self.ctx.is_main and self.step % self.s.push_every == 0:
            outcome = self._push_weights(full)
            push_s, push_ok = outcome.seconds, outcome.ok
        if self.s.eval_every and self.step % self.s.eval_every == 0:
            eval_s = self._maybe_eval(full)
        if self.ctx.is_main:
            self._report(stats, wait_s, ckpt_s, push_s, push_ok, eval_s)

    def _commit_step(self, groups: list[TrainGroup]) -> None:
        batch = self._batch
        marker = learn_marker("trained", self.step)
        self.window.extend(Decided(d, d.message.group_id, marker) for d in batch.train)
        self.counters["steps"] += 1
        self.counters["groups_trained"] += len(groups)
        self.store.set_fields(step=self.step, policy_version=self.version)
        if self._waiting_code is not None:
            self.store.clear_waiting()
            self._waiting_code = None
        self.flow.consumed(len(groups))
        self.consumed_total += len(groups)
        self.store.incr({counters.LEARNER_STEPS: 1, counters.LEARNER_GROUPS_TRAINED: len(groups)})
        assert self.metrics is not None
        self.metrics.groups_seen("trained", len(groups))

    # -- commit, push, evaluate -------------------------------------------------------------------
    def _due(self, step: int) -> bool:
        s = self.s
        return (
            step % s.checkpoint_every == 0
            or step % s.push_every == 0
            or bool(s.eval_every and step % s.eval_every == 0)
        )

    def _gather_if_needed(self, force: bool = False) -> dict[str, torch.Tensor] | None:
        """The full weights for checkpoint / push / eval (a collective under FSDP2)."""
        if not self.ctx.enabled or not (force or self._due(self.step)):
            return None
        return full_model_state(self.model, self.ctx)

    def _checkpoint(self, full: dict[str, torch.Tensor] | None) -> float:
        start = time.perf_counter()
        optim = full_optimizer_state(self.model, self.trainer.optimizer, self.ctx)
        if self.ctx.is_main:
            state = CheckpointState(
                seq=self.seq,
                step=self.step,
                version=self.version,
                total_steps=self.margin_total,
                consumed_total=self.consumed_total,
                counters=dict(self.counters),
                records=[
                    EntryRecord(entry_id=d.delivery.entry_id, group_id=d.group_id, marker=d.marker)
                    for d in self.window
                ],
                world_size=self.ctx.world_size,
                objective=self.s.objective,
            )
            path = self.ckpts.save(
                state,
                lambda p: self._write_model(p, full),
                {
                    "optimizer": optim,
                    "scheduler": self.trainer.scheduler.state_dict(),
                    "rng": capture_rng(),
                },
            )
            self.seq += 1
            self.released = Ledger(base_seq=state.seq)  # the checkpoint absorbed the ledger
            self.ckpts.drop_ledger()
            self.last_ckpt_path = str(path / "model")
            log.info("checkpoint %s (%d entries recorded)", path.name, len(self.window))
            self._ack_window()
        self.last_ckpt_step = self.step
        self.ctx.barrier()
        return time.perf_counter() - start

    def _write_model(self, path: Path, full: dict[str, torch.Tensor] | None) -> None:
        if full is None:
            self.model.save_pretrained(path, safe_serialization=True)
        else:
            # Gathered tensors are copies, so tied weights (lm_head = embeddings) no longer look
            # shared: keep parameters under their first name only, as save_pretrained does.
            names = {n for n, _ in self.model.named_parameters()}
            names |= {n for n, _ in self.model.named_buffers()}
            state = {k: v for k, v in full.items() if k in names}
            self.model.save_pretrained(path, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(path)

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

    def _push_weights(self, full: dict[str, torch.Tensor] | None):
        assert self.push is not None
        outcome = self.push.push(
            parameter_list(self.model, full, dtype=self.push_dtype),
            version=self.version,
            step=self.step,
            checkpoint_path=self.last_ckpt_path,
        )
        self.last_push_version = self.version
        if not outcome.ok:
            self.store.incr({counters.LEARNER_PUSH_FAILURES: 1})
        self.store.set_fields(last_push_version=self.version, last_push_ok=int(outcome.ok))
        return outcome

    def _eval_target(self, full: dict[str, torch.Tensor] | None):
        if not self.ctx.enabled:
            return self.model
        if self._eval_model is None:
            from conspo.models.tiny import load_policy

            self._eval_model, _ = load_policy(self.base_path, self.ctx.device, torch.float32)
        assert full is not None
        self._eval_model.load_state_dict(full, strict=False)
        return self._eval_model

    def _maybe_eval(self, full: dict[str, torch.Tensor] | None = None, force: bool = False):
        if self.last_eval_step == self.step:
            return 0.0
        if force and self.ctx.enabled:
            full = full_model_state(self.model, self.ctx)
        self.last_eval_step = self.step
        if not self.ctx.is_main or self.evaluator is None:
            return 0.0
        record = self.evaluator.run(self._eval_target(full), self.step)
        assert self.metrics is not None
        self.metrics.eval(record)
        return float(record["eval_s"])

    def _report(
        self,
        stats: StepStats,
        wait_s: float,
        ckpt_s: float,
        push_s: float,
        push_ok: bool | None,
        eval_s: float,
    ) -> None:
        assert self.metrics is not None
        timings = {"wait": wait_s, "checkpoint": ckpt_s, "push": push_s, "eval": eval_s}
        record = step_record(self.step, self.version, self._batch, stats, timings)
        record["push_ok"] = push_ok
        self.metrics.train({k: v for k, v in record.items() if v is not None})

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self, reason: str) -> str:
        """Final checkpoint (if anything is uncommitted), final push and eval, state status."""
        dirty = self.step != self.last_ckpt_step or bool(self.window)
        dirty = self.ctx.broadcast_object(dirty)
        full = None
        if dirty or reason == "finish":
            full = self._gather_if_needed(force=True)
        if dirty:
            self._checkpoint(full)
        status = "finished" if reason == "finish" else "idle"
        if reason == "finish" and self.evaluator is not None and self.s.eval_every:
            self._maybe_eval(full)
        if self.ctx.is_main:
            if reason == "finish" and self.last_push_version != self.version:
                self._push_weights(full)
            self.store.clear_waiting()
            self.store.set_fields(step=self.step, policy_version=self.version, status=status)
            log.info("learner %s at step %d (version %d)", status, self.step, self.version)
        return status

    def close(self) -> None:
        if self.push is not None:
            self.push.close()
        if self.metrics is not None:
            self.metrics.close()
