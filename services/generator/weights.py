"""How new weights reach the engine: follow the learner's announcements, stage, apply.

The loop sees one small object, ``WeightSync`` (take_staged / apply / report_served / close);
what stands behind it depends on where the engine's weights live:

- ``hf``: the model is in this process, so ``conspo.weight_sync.WeightSubscriber`` receives each
  broadcast (or loads the announced checkpoint) into staging tensors in a background thread, and
  ``apply`` copies them into the model between two engine calls.
- ``vllm`` (tensor parallel 1): the model lives in vLLM's worker process, which joins the group
  itself (``services.generator.vllm_worker``) and stages what it receives. The same
  ``WeightSubscriber`` follows the announcements, with an ``EngineReceiver`` that hands the
  tensor work (receive, checkpoint load) to the engine, so the broadcast never crosses a process
  boundary twice.
- ``vllm`` with tensor parallelism: one member can only be one rank of the learner's group, and
  every TP worker needs the full tensors, so these generators do not register for broadcasts;
  ``conspo.weight_sync.CheckpointFollower`` stages every announced checkpoint instead (the
  learner checkpoints for late joiners anyway).

Which path a backend takes follows from its type: an ``EngineBackend`` holds its weights in its
own processes, any other ``Backend`` in this one (``services.generator.backends.base``).

Late join (``initial_load``): before the first request, if the learner has announced a version
with a checkpoint newer than what the engine loaded, the engine loads it synchronously; the
subscriber later stages the same checkpoint, which the loop recognises and skips.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from conspo.keys import Keys
from conspo.protocol import Rendezvous, WeightAnnouncement
from conspo.service import ServiceRuntime
from conspo.settings import GeneratorSettings
from conspo.weight_sync import (
    CheckpointFollower,
    Follower,
    LayoutMismatchError,
    Receiver,
    StagedWeights,
    WeightSubscriber,
    WeightSyncError,
    read_announcement,
)
from services.generator.backends.base import Backend, EngineBackend

log = logging.getLogger(__name__)

Apply = Callable[[StagedWeights], None]


@dataclass
class EngineStaged(StagedWeights):
    """A version the engine holds itself (broadcast) or will read itself (checkpoint)."""

    checkpoint_path: str | None = None
    ticket: str | None = None


class WeightSync:
    """The loop's view of weight updates: a transport's follower and how staged versions reach
    the engine."""

    def __init__(
        self, follower: Follower, apply: Apply, *, on_close: Callable[[], None] | None = None
    ) -> None:
        self.follower = follower
        self._apply = apply
        self._on_close = on_close

    def take_staged(self) -> StagedWeights | None:
        return self.follower.take_staged()

    def on_staged(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the follower's thread) whenever a version is staged; a
        follower without the hook (``CheckpointFollower``) leaves the loop to its poll bound."""
        hooks = getattr(self.follower, "on_staged", None)
        if hooks is not None:
            hooks.append(callback)

    def apply(self, staged: StagedWeights) -> None:
        self._apply(staged)

    def report_served(self, version: int) -> None:
        self.follower.report_served(version)

    def latest_announcement(self) -> WeightAnnouncement | None:
        return self.follower.latest_announcement()

    @property
    def last_error(self) -> str | None:
        return self.follower.last_error

    def close(self) -> None:
        self.follower.close()
        if self._on_close is not None:
            self._on_close()


# -- late join -------------------------------------------------------------------------------------
def initial_load(client: redis.Redis, keys: Keys, backend: Backend, loaded_version: int = 0) -> int:
    """Load the announced checkpoint if it is newer than ``loaded_version``; returns the version
    the engine serves afterwards (``loaded_version`` when there is nothing newer to load or the
    load failed: the subscriber then retries from the next announcement)."""
    try:
        ann = read_announcement(client, keys)
    except redis.RedisError as exc:
        log.warning("could not read the weight announcement: %s", exc)
        return loaded_version
    if ann is None or ann.version <= loaded_version:
        return loaded_version
    if not ann.checkpoint_path:
        log.warning(
            "the learner is at v%d but announced no checkpoint: serving v%d until the next push",
            ann.version,
            loaded_version,
        )
        return loaded_version
    t0 = time.perf_counter()
    try:
        backend.load_checkpoint(ann.checkpoint_path)
    except Exception as exc:
        log.error(
            "late join: could not load v%d from %s: %s", ann.version, ann.checkpoint_path, exc
        )
        return loaded_version
    log.info(
        "late join: loaded v%d from %s in %.2fs",
        ann.version,
        ann.checkpoint_path,
        time.perf_counter() - t0,
    )
    return ann.version


# -- following ------------------------------------------------------------------------------------
def subscribe(
    runtime: ServiceRuntime,
    settings: GeneratorSettings,
    backend: Backend,
    receiver: Receiver | None = None,
) -> WeightSubscriber:
    """A started broadcast follower for ``backend`` (``receiver=None``: into this process)."""
    subscriber = WeightSubscriber(
        runtime.client,
        runtime.keys,
        runtime.instance,
        backend=settings.weight_sync_backend,
        timeout_s=settings.weight_sync_timeout_s,
        heartbeat_s=settings.heartbeat_s,
        # Where the tensors are received: the learner is offered NCCL only on a GPU.
        device=backend.device,
        receiver=receiver,
    )
    subscriber.start(backend.weight_template)
    return subscriber


def start_hf_sync(
    runtime: ServiceRuntime, settings: GeneratorSettings, backend: Backend
) -> WeightSync:
    """Weights in this process: the subscriber receives into staging tensors, ``load_weights``
    copies them in."""

    def apply(staged: StagedWeights) -> None:
        backend.load_weights(staged.tensors.items())

    return WeightSync(subscribe(runtime, settings, backend), apply)


# -- the engine-side (vllm) path ------------------------------------------------------------------
class EngineReceiver:
    """``conspo.weight_sync.Receiver`` for an engine that holds its own weights (vLLM).

    The subscriber keeps doing everything but the tensor work: a round thread calls
    ``receive``, which asks the engine's worker to receive in the background
    (``start_receive``) and polls it (``poll_receive``) until it is done; the staged version is
    a ticket into the worker's staging area, applied later with ``apply_received(ticket)``.
    Checkpoints are staged as their path and read by the worker when applied.
    """

    def __init__(self, engine: EngineBackend, *, timeout_s: float) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.poll_s = 0.05

    def receive(self, announcement: WeightAnnouncement, rank: int) -> StagedWeights:
        rdv = announcement.rendezvous
        if rdv is None:
            raise ValueError("announcement has no rendezvous")
        ticket = uuid.uuid4().hex
        t0 = time.perf_counter()
        self.engine.start_receive(
            ticket, rdv, rank, version=announcement.version, timeout_s=self.timeout_s
        )
        # open + handshake + buckets each have the group timeout; this bound is only a backstop.
        deadline = time.monotonic() + 4 * self.timeout_s + 60
        while True:
            status = self.engine.poll_receive(ticket)
            if status.get("done"):
                break
            if time.monotonic() > deadline:
                raise WeightSyncError(
                    f"the engine did not finish receiving v{announcement.version}"
                )
            time.sleep(self.poll_s)
        if not status.get("ok"):
            if status.get("refused"):
                raise LayoutMismatchError(str(status.get("error")))
            raise WeightSyncError(str(status.get("error")))
        return EngineStaged(
            version=announcement.version,
            step=announcement.step,
            tensors={},
            source="broadcast",
            epoch=rdv.epoch,
            seconds=time.perf_counter() - t0,
            announced_at=announcement.created_at,
            ticket=ticket,
        )

    def leave(self, rendezvous: Rendezvous) -> None:
        try:
            self.engine.leave_weight_group(rendezvous)
        except Exception as exc:  # a dying engine must not break the subscriber thread
            log.warning("engine could not leave weight-sync epoch %d: %s", rendezvous.epoch, exc)

    def load_checkpoint(self, announcement: WeightAnnouncement) -> StagedWeights:
        path = announcement.checkpoint_path
        if not path or not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return EngineStaged(
            version=announcement.version,
            step=announcement.step,
            tensors={},
            source="checkpoint",
            announced_at=announcement.created_at,
            checkpoint_path=path,
        )


def engine_applier(backend: EngineBackend) -> Apply:
    """How a staged version reaches an engine that holds its own weights."""

    def apply(staged: StagedWeights) -> None:
        path = staged.checkpoint_path if isinstance(staged, EngineStaged) else None
        if staged.source == "checkpoint" and path:
            backend.load_checkpoint(path)
        elif isinstance(staged, EngineStaged) and staged.ticket:
            backend.apply_received(staged.ticket)
        else:
            backend.load_weights(staged.tensors.items())

    return apply


def start_engine_sync(
    runtime: ServiceRuntime, settings: GeneratorSettings, backend: EngineBackend
) -> WeightSync:
    """Weights in the engine's processes: its worker receives broadcasts itself, or, when it
    cannot (tensor parallel), the engine reads each announced checkpoint."""
    receiver = EngineReceiver(backend, timeout_s=settings.weight_sync_timeout_s)
    follower: Follower
    if backend.receives_broadcast:
        follower = subscribe(runtime, settings, backend, receiver)
    else:
        checkpoints = CheckpointFollower(
            runtime.client, runtime.keys, runtime.instance, receiver, poll_s=settings.heartbeat_s
        )
        checkpoints.start()
        follower = checkpoints
    return WeightSync(follower, engine_applier(backend))


def start_weight_sync(
    runtime: ServiceRuntime, settings: GeneratorSettings, backend: Backend
) -> WeightSync:
    """The follower that fits ``backend`` (see the module docstring)."""
    if isinstance(backend, EngineBackend):
        return start_engine_sync(runtime, settings, backend)
    return start_hf_sync(runtime, settings, backend)
