"""The generator's side: stay registered, follow announcements, stage every received version.

Why staging: receives land in fresh tensors and never touch the live model; the generator calls
``take_staged()`` between requests and copies the weights in, so it never serves a half-updated
model, and a failed transfer leaves nothing behind (the partly filled buffer is dropped).

Why announcements are taken from the pub/sub channel and the ``current`` snapshot is only a
fallback: every announcement naming this member stands for exactly one round of collectives in
its group, so the member must see each one, in order. The thread subscribes first, then reads the
snapshot, then registers: an announcement that can name this incarnation is written after the
registration, hence arrives on the channel. The snapshot (and a ``current`` value that the
channel did not deliver within a grace period, e.g. after a Redis reconnect) is never joined:
the round it stands for has started without us, so a stale group is dropped and the member
falls back to the announcement's checkpoint, if any.

Why each round runs in its own thread: in a broadcast tree or ring a member can wait on another
member, not only on the learner, and a blocked gloo collective cannot be interrupted (``abort``
from another thread does not wake it). If a peer wedges, the learner gives up after its timeout
and announces a new group; a member stuck in the old round would miss it until its own timeout.
So the sync loop only dispatches rounds: when the learner moves on, the stuck round is retired
(it ends with its own timeout, in the background) and the member joins the new group at once.
A retired round that still completes is staged if nothing newer was staged meanwhile ("newer" =
announced later, not a larger version: a learner resumed from an older checkpoint re-pushes
lower versions, and those are the weights to serve).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import redis
import torch
import torch.distributed as dist

from conspo.keys import Keys
from conspo.protocol import DecodeError, Rendezvous, WeightAnnouncement, decode
from conspo.weight_sync.checkpoint import load_checkpoint
from conspo.weight_sync.group import LayoutMismatchError, WeightGroup, open_group
from conspo.weight_sync.layout import (
    BufferPool,
    Layout,
    TensorSource,
    copy_tensor,
    layout_of,
    named_tensors_of,
    unbucketize,
)
from conspo.weight_sync.membership import (
    MemberInfo,
    deregister_member,
    read_announcement,
    register_member,
)
from conspo.weight_sync.membership import report_served as _report_served

logger = logging.getLogger(__name__)


@dataclass
class StagedWeights:
    """A complete received version, ready to be copied into the model."""

    version: int
    step: int
    tensors: dict[str, torch.Tensor]
    source: Literal["broadcast", "checkpoint"]
    epoch: int | None = None
    seconds: float = 0.0
    announced_at: float = 0.0
    received_at: float = field(default_factory=time.time)

    def apply_to(self, target: TensorSource) -> None:
        """Copy into the matching tensors of ``target`` (a module's parameters, or a list)."""
        for name, tensor in named_tensors_of(target):
            copy_tensor(tensor, self.tensors[name])


def _ann_key(ann: WeightAnnouncement) -> tuple[int, int, float]:
    return (ann.version, ann.rendezvous.epoch if ann.rendezvous else -1, ann.created_at)


class CheckpointLoader(Protocol):
    """Stages the checkpoint an announcement names (``LocalReceiver`` reads the tensors; an
    engine that reads files itself stages the path)."""

    def load_checkpoint(self, announcement: WeightAnnouncement) -> StagedWeights:
        """Stage ``announcement.checkpoint_path`` (raise OSError/KeyError/ValueError if not)."""
        ...


class Receiver(CheckpointLoader, Protocol):
    """What a subscriber delegates the tensor work to; the default is ``LocalReceiver``.

    An engine whose weights live in another process (e.g. a vLLM worker that joins the group
    itself with ``open_group`` / ``WeightGroup.iter_receive``) implements these three methods
    and passes itself as ``WeightSubscriber(..., receiver=...)``; announcement following,
    membership, retiring stuck rounds, checkpoint fallback and staging stay the subscriber's.
    """

    def receive(self, announcement: WeightAnnouncement, rank: int) -> StagedWeights:
        """Take part in the round ``announcement`` stands for, as ``rank``, joining its group
        first if needed (groups are reused while the rendezvous stays the same). Raise
        ``LayoutMismatchError`` if refused (the group stays usable) or any other exception if
        the round failed (the group must then be dropped). Called from a round thread."""
        ...

    def leave(self, rendezvous: Rendezvous) -> None:
        """Leave that group; a receive still running in it may finish or fail on its own."""
        ...


def _rdv_key(rdv: Rendezvous) -> str:
    return rdv.model_dump_json()


@dataclass
class _Slot:
    group: WeightGroup | None = None
    busy: int = 0
    retired: bool = False


class LocalReceiver:
    """Receives into staging tensors in this process (the hf generator, tests, tools)."""

    def __init__(
        self,
        template: TensorSource,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = 60.0,
        advertise_host: str | None = None,
    ) -> None:
        self.template = [(n, t.detach()) for n, t in named_tensors_of(template)]
        self.layout = layout_of(self.template)
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.advertise_host = advertise_host
        self._slots: dict[str, _Slot] = {}
        self._pool = BufferPool(2)  # the staged version the generator holds + the next one
        self._lock = threading.Lock()

    def receive(self, announcement: WeightAnnouncement, rank: int) -> StagedWeights:
        rdv = announcement.rendezvous
        if rdv is None:
            raise ValueError("announcement has no rendezvous")
        key = _rdv_key(rdv)
        with self._lock:
            slot = self._slots.setdefault(key, _Slot())
            slot.busy += 1
        try:
            if slot.group is None or slot.group.closed:
                slot.group = open_group(
                    rdv,
                    rank,
                    self.timeout_s,
                    self.device if rdv.backend == "nccl" else None,
                    advertise_host=self.advertise_host,
                )
            flat, header = slot.group.receive_flat(
                self.layout, expect_version=announcement.version, pool=self._pool
            )
            flat = flat.to(self.device)
            return StagedWeights(
                version=announcement.version,
                step=announcement.step,
                tensors=dict(unbucketize(flat, self.layout)),
                source="broadcast",
                epoch=header.epoch,
                announced_at=announcement.created_at,
            )
        except LayoutMismatchError:
            raise
        except BaseException:
            if slot.group is not None:
                slot.group.close()
            raise
        finally:
            with self._lock:
                slot.busy -= 1
                self._collect(key, slot)

    def leave(self, rendezvous: Rendezvous) -> None:
        key = _rdv_key(rendezvous)
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                slot.retired = True
                self._collect(key, slot)

    def _collect(self, key: str, slot: _Slot) -> None:
        if (slot.retired or (slot.group is not None and slot.group.closed)) and not slot.busy:
            if slot.group is not None:
                slot.group.close()
            self._slots.pop(key, None)

    def load_checkpoint(self, announcement: WeightAnnouncement) -> StagedWeights:
        assert announcement.checkpoint_path is not None
        return StagedWeights(
            version=announcement.version,
            step=announcement.step,
            tensors=load_checkpoint(
                announcement.checkpoint_path, self.template, device=self.device
            ),
            source="checkpoint",
            announced_at=announcement.created_at,
        )

    def close(self) -> None:
        with self._lock:
            for key, slot in list(self._slots.items()):
                slot.retired = True
                self._collect(key, slot)


class _Round:
    """One round of collectives for one announcement, in its own thread."""

    def __init__(self, sub: WeightSubscriber, ann: WeightAnnouncement) -> None:
        assert ann.rendezvous is not None
        self.ann = ann
        self.rendezvous = ann.rendezvous
        self.rank = ann.rendezvous.members.index(sub.instance) + 1
        self.result: StagedWeights | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self._receiver = sub.receiver
        self.thread = threading.Thread(
            target=self._run, name=f"weights-rx-{sub.instance}-v{ann.version}", daemon=True
        )
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            assert self._receiver is not None
            self.result = self._receiver.receive(self.ann, self.rank)
        except BaseException as exc:
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - t0
            if self.result is not None:
                self.result.seconds = self.result.seconds or self.seconds
                self.result.announced_at = self.ann.created_at


class WeightSubscriber:
    """One generator instance's membership in the weight-sync group."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        instance: str,
        *,
        backend: Literal["auto", "gloo", "nccl"] = "auto",
        timeout_s: float = 60.0,
        heartbeat_s: float = 2.0,
        device: torch.device | str = "cpu",
        load_checkpoints: bool = True,
        advertise_host: str | None = None,
        receiver: Receiver | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.instance = instance
        self.backend = backend
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.device = torch.device(device)
        self.load_checkpoints = load_checkpoints
        self.advertise_host = advertise_host
        self.receiver = receiver
        self.last_error: str | None = None
        self.counters = {"broadcast": 0, "checkpoint": 0, "failed": 0, "refused": 0}
        self._layout: Layout | None = None
        self._info: MemberInfo | None = None
        self._latest: WeightAnnouncement | None = None
        self._staged: StagedWeights | None = None
        self._have_at = -1.0  # announcement time of the newest weights staged
        self._served: int | None = None
        self._seen: deque[tuple[int, int, float]] = deque(maxlen=256)
        # Owned by the sync thread: the group this member is in, the round in flight in it,
        # and rounds of abandoned groups still running out their timeout.
        self._rdv: Rendezvous | None = None
        self._round: _Round | None = None
        self._retired: list[_Round] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        #: Called (in the sync thread) after each version is staged: the generator wakes its
        #: loop instead of finding the weights at its next poll.
        self.on_staged: list[Callable[[], None]] = []

    # -- public ----------------------------------------------------------------------------------
    @property
    def layout(self) -> Layout | None:
        return self._layout

    @property
    def epoch(self) -> int | None:
        """The epoch of the group this member currently belongs to (None when in none)."""
        rdv = self._rdv
        return rdv.epoch if rdv is not None else None

    @property
    def served_version(self) -> int | None:
        return self._served

    def start(self, template: TensorSource) -> None:
        """Start following announcements; ``template`` fixes names, shapes and dtypes."""
        if self._threads:
            raise RuntimeError("already started")
        items = named_tensors_of(template)  # once: ``template`` may be an iterator
        self._layout = layout_of(items)
        if self.receiver is None:
            self.receiver = LocalReceiver(
                items,
                device=self.device,
                timeout_s=self.timeout_s,
                advertise_host=self.advertise_host,
            )
        backends = ["gloo"]
        if self.device.type == "cuda" and dist.is_nccl_available():
            backends.append("nccl")
        if self.backend != "auto":
            backends = [self.backend]
        self._info = MemberInfo(
            instance=self.instance,
            layout_hash=self._layout.hash,
            backends=backends,
            beat_s=self.heartbeat_s,
        )
        ready = threading.Event()
        sync = threading.Thread(
            target=self._sync_loop, args=(ready,), name=f"weights-sync-{self.instance}", daemon=True
        )
        beat = threading.Thread(
            target=self._heartbeat_loop, name=f"weights-beat-{self.instance}", daemon=True
        )
        self._threads = [sync, beat]
        sync.start()
        if not ready.wait(timeout=max(self.timeout_s, 10.0)):
            logger.warning("weight subscriber %s: registration is slow", self.instance)
        beat.start()

    def take_staged(self) -> StagedWeights | None:
        """The newest fully received version not handed out yet (each one is handed out once)."""
        with self._lock:
            staged, self._staged = self._staged, None
            return staged

    def report_served(self, version: int) -> None:
        """Record that this instance now serves ``version`` (``served:<instance>``)."""
        self._served = version
        _report_served(self.client, self.keys, self.instance, version)

    def latest_announcement(self) -> WeightAnnouncement | None:
        return self._latest

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads, leave the group and deregister (idempotent)."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                logger.warning("%s still busy; leaving it", thread.name)
        with contextlib.suppress(redis.RedisError):
            deregister_member(self.client, self.keys, self.instance)

    def __enter__(self) -> WeightSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registration ----------------------------------------------------------------------------
    def _register(self) -> None:
        assert self._info is not None
        try:
            register_member(self.client, self.keys, self._info)
        except redis.RedisError as exc:
            logger.warning("weight subscriber %s: registration failed: %s", self.instance, exc)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._register()

    def _processed(self, ann: WeightAnnouncement) -> None:
        assert self._info is not None
        update: dict[str, object] = {"seen_at": max(self._info.seen_at, ann.created_at)}
        if ann.rendezvous is not None:
            update["epoch_seen"] = max(self._info.epoch_seen, ann.rendezvous.epoch)
        self._info = self._info.model_copy(update=update)
        self._register()  # at once: the learner may be waiting to re-admit us

    # -- the sync thread -------------------------------------------------------------------------
    def _sync_loop(self, ready: threading.Event) -> None:
        pubsub = None
        try:
            pubsub = self._subscribe()
            snapshot = read_announcement(self.client, self.keys)
            self._register()
            ready.set()
            if snapshot is not None:
                self._handle(snapshot, fresh=False)
            self._follow(pubsub)
        except Exception as exc:  # the thread must report, not vanish
            self.last_error = f"weight sync thread died: {type(exc).__name__}: {exc}"
            logger.exception("weight subscriber %s: sync thread died", self.instance)
        finally:
            ready.set()
            self._shutdown()
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _subscribe(self) -> redis.client.PubSub:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.keys.weights_channel)
        return pubsub

    def _follow(self, pubsub: redis.client.PubSub) -> None:
        grace = max(2 * self.heartbeat_s, 1.0)
        next_poll = time.monotonic() + self.heartbeat_s
        pending: dict[tuple[int, int, float], float] = {}
        while not self._stop.is_set():
            self._reap()
            # A received round is staged by this loop (``_reap``), so while one is in flight
            # the loop looks every few ms: waiting the idle 100 ms here was the largest
            # hand-off delay of a step (docs/benchmarks.md, vs TRL).
            wait_s = 0.002 if self._round is not None else 0.1
            try:
                message = pubsub.get_message(timeout=wait_s)
            except (redis.RedisError, OSError) as exc:
                logger.warning("weight subscriber %s: channel lost (%s)", self.instance, exc)
                with contextlib.suppress(Exception):
                    pubsub.close()
                self._stop.wait(0.5)
                pubsub = self._subscribe()
                continue
            if message and message.get("type") == "message":
                try:
                    ann = decode(message["data"], WeightAnnouncement)
                except DecodeError as exc:
                    logger.warning("ignoring bad weight announcement: %s", exc)
                else:
                    self._handle(ann, fresh=True)
                continue
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + self.heartbeat_s
            with contextlib.suppress(redis.RedisError):
                current = read_announcement(self.client, self.keys)
                if current is None or _ann_key(current) in self._seen:
                    pending.clear()
                    continue
                first = pending.setdefault(_ann_key(current), time.monotonic())
                if time.monotonic() - first >= grace:
                    logger.warning(
                        "weight subscriber %s: announcement v%d did not come on the channel",
                        self.instance,
                        current.version,
                    )
                    pending.clear()
                    self._handle(current, fresh=False)

    def _handle(self, ann: WeightAnnouncement, *, fresh: bool) -> None:
        key = _ann_key(ann)
        if key in self._seen:
            return
        self._seen.append(key)
        self._latest = ann
        try:
            self._process(ann, fresh=fresh)
        finally:
            self._processed(ann)

    def _process(self, ann: WeightAnnouncement, *, fresh: bool) -> None:
        assert self._layout is not None
        rdv = ann.rendezvous
        if ann.layout_hash is not None and ann.layout_hash != self._layout.hash:
            self._leave()
            self.counters["refused"] += 1
            self._error(
                f"layout mismatch: the learner publishes layout {ann.layout_hash} "
                f"({ann.num_params} params, {ann.num_bytes} bytes), this model has "
                f"{self._layout.describe()}; version {ann.version} not taken"
            )
            return
        if rdv is not None and self.instance in rdv.members and fresh:
            if rdv.backend == "nccl" and self.device.type != "cuda":
                self._leave()
                self._error(f"v{ann.version} is sent over NCCL but this member is on {self.device}")
            else:
                self._dispatch(ann)
                return
        else:
            # Not in this round: the learner moved on without us (or ran a round we missed).
            self._leave()
        self._maybe_load_checkpoint(ann)

    def _dispatch(self, ann: WeightAnnouncement) -> None:
        rdv = ann.rendezvous
        assert rdv is not None and self.receiver is not None
        rnd = self._round
        if rnd is not None and rnd.rendezvous == rdv:
            # Same group: the learner finished that round before announcing this one, so ours
            # is finishing too, and the group can only be used again once it has.
            rnd.thread.join(self.timeout_s)
            self._reap()
        self._retire_round()
        if self._rdv is not None and self._rdv != rdv:
            self.receiver.leave(self._rdv)
        self._rdv = rdv
        self._round = _Round(self, ann)

    def _reap(self) -> None:
        rnd = self._round
        if rnd is not None and rnd.done:
            self._round = None
            self._finish(rnd, current=True)
        for old in [r for r in self._retired if r.done]:
            self._retired.remove(old)
            self._finish(old, current=False)

    def _finish(self, rnd: _Round, *, current: bool) -> None:
        ann = rnd.ann
        if rnd.result is not None:
            self.counters["broadcast"] += 1
            self._stage(rnd.result)
        elif isinstance(rnd.error, LayoutMismatchError):
            self.counters["refused"] += 1
            self._error(str(rnd.error))
        else:
            self.counters["failed"] += 1
            message = f"broadcast of v{ann.version} failed: {rnd.error}"
            if current:
                self._error(message)
                self._leave()
            else:  # expected: we left that group because the learner had moved on
                logger.info("weight subscriber %s: abandoned %s", self.instance, message)
            self._maybe_load_checkpoint(ann)

    def _retire_round(self) -> None:
        if self._round is not None:
            self._retired.append(self._round)
            self._round = None

    def _leave(self) -> None:
        """Leave the current group; a round still running in it is retired, not waited for."""
        self._retire_round()
        rdv, self._rdv = self._rdv, None
        if rdv is not None and self.receiver is not None:
            self.receiver.leave(rdv)

    def _shutdown(self) -> None:
        self._leave()
        for rnd in self._retired:
            rnd.thread.join(1.0)
        close = getattr(self.receiver, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()

    # -- staging ---------------------------------------------------------------------------------
    def _maybe_load_checkpoint(self, ann: WeightAnnouncement) -> None:
        if not (self.load_checkpoints and ann.checkpoint_path) or ann.created_at <= self._have_at:
            return
        assert self.receiver is not None
        t0 = time.perf_counter()
        try:
            staged = self.receiver.load_checkpoint(ann)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            self._error(f"could not load v{ann.version} from {ann.checkpoint_path}: {exc}")
            return
        staged.seconds = staged.seconds or time.perf_counter() - t0
        staged.announced_at = ann.created_at
        self.counters["checkpoint"] += 1
        self._stage(staged)

    def _stage(self, staged: StagedWeights) -> None:
        with self._lock:
            if staged.announced_at < self._have_at:
                logger.info("dropping v%d: a later announcement is staged", staged.version)
                return
            self._staged = staged
            self._have_at = staged.announced_at
            self.last_error = None
        for hook in self.on_staged:
            try:
                hook()
            except Exception as exc:  # a lost wake-up costs one poll interval, no more
                logger.warning("on_staged hook failed: %s", exc)
        logger.info(
            "weight subscriber %s staged v%d from %s in %.3fs",
            self.instance,
            staged.version,
            staged.source,
            staged.seconds,
        )

    def _error(self, message: str) -> None:
        self.last_error = message
        logger.error("weight subscriber %s: %s", self.instance, message)
