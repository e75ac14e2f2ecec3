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
  ``CheckpointFollower`` stages every announced checkpoint instead (the learner checkpoints for
  late joiners anyway).

Late join (``initial_load``): before the first request, if the learner has announced a version
with a checkpoint newer than what the engine loaded, the engine loads it synchronously; the
subscriber later stages the same checkpoint, which the loop recognises and skips.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from conspo.protocol import Rendezvous, WeightAnnouncement
from conspo.service import ServiceRuntime
from conspo.settings import GeneratorSettings
from conspo.weight_sync import (
    LayoutMismatchError,
    StagedWeights,
    WeightSubscriber,
    WeightSyncError,
    read_announcement,
)
from conspo.weight_sync.layout import dtype_from_name, dtype_name
from conspo.weight_sync.membership import report_served as _report_served

log = logging.getLogger(__name__)

TensorList = list[tuple[str, torch.Tensor]]


@dataclass
class EngineStaged(StagedWeights):
    """A version the engine holds itself (broadcast) or will read itself (checkpoint)."""

    checkpoint_path: str | None = None
    ticket: str | None = None


class WeightSync:
    """The loop's view of weight updates."""

    def __init__(
        self,
        follower: Any,
        apply: Callable[[StagedWeights], None],
        *,
        on_close: Callable[[], None] | None = None,
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


# -- templates -------------------------------------------------------------------------------------
def template_from_model(model: torch.nn.Module, dtype: torch.dtype | None = None) -> TensorList:
    """The (name, tensor) list the learner sends for this architecture: ``named_parameters`` (tied
    weights once). With ``dtype``, meta tensors of that dtype stand in (no memory)."""
    out = []
    for name, p in model.named_parameters():
        if dtype is None or p.dtype == dtype:
            out.append((name, p.detach()))
        else:
            out.append((name, torch.empty(p.shape, dtype=dtype, device="meta")))
    return out


def template_from_config(model_path: str | Path, dtype: torch.dtype) -> TensorList:
    """The Hugging Face parameter list of the model at ``model_path``, as meta tensors.

    The vLLM engine's own parameters are fused and sharded (``qkv_proj``, ``gate_up_proj``);
    the learner sends Hugging Face names, which vLLM's ``load_weights`` maps. So the template is
    built from the checkpoint's config on the meta device: names, shapes and dtype, no memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_path), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return [(n, p.detach()) for n, p in model.named_parameters()]


def specs_of(template: TensorList) -> list[list[Any]]:
    """A plain-data description of a template (crosses vLLM's RPC without pickling)."""
    return [[name, list(t.shape), dtype_name(t.dtype)] for name, t in template]


def template_from_specs(specs: list[list[Any]]) -> TensorList:
    return [
        (str(name), torch.empty(tuple(shape), dtype=dtype_from_name(dt), device="meta"))
        for name, shape, dt in specs
    ]


def sync_dtype(setting: str) -> torch.dtype:
    """The dtype the learner sends: a generator's ``weight_sync_dtype`` (``auto``: float32, the
    learner's default), whatever dtype its engine serves in; both backends cast on load."""
    return torch.float32 if setting == "auto" else dtype_from_name(setting)


# -- late join -------------------------------------------------------------------------------------
def initial_load(client: redis.Redis, keys: Any, backend: Any, loaded_version: int = 0) -> int:
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


# -- the in-process (hf) path ---------------------------------------------------------------------
def hf_template(model: torch.nn.Module, weight_sync_dtype: str) -> TensorList:
    """What the hf engine expects from the learner: its parameters in the LEARNER's dtype, not
    the engine's own (bf16 on a GPU); ``load_weights`` casts on receipt."""
    return template_from_model(model, sync_dtype(weight_sync_dtype))


def start_hf_sync(runtime: ServiceRuntime, settings: GeneratorSettings, backend: Any) -> WeightSync:
    model = backend.model
    device = next(model.parameters()).device
    template = hf_template(model, settings.weight_sync_dtype)
    subscriber = WeightSubscriber(
        runtime.client,
        runtime.keys,
        runtime.instance,
        backend=settings.weight_sync_backend,
        timeout_s=settings.weight_sync_timeout_s,
        heartbeat_s=settings.heartbeat_s,
        device=device,
    )
    subscriber.start(template)

    def apply(staged: StagedWeights) -> None:
        backend.load_weights(staged.tensors.items())

    return WeightSync(subscriber, apply)


# -- the engine-side (vllm) path ------------------------------------------------------------------
class EngineReceiver:
    """``conspo.weight_sync.Receiver`` for an engine that holds its own weights (vLLM).

    The subscriber keeps doing everything but the tensor work: a round thread calls
    ``receive``, which asks the engine's worker to receive in the background
    (``start_receive``) and polls it (``poll_receive``) until it is done; the staged version is
    a ticket into the worker's staging area, applied later with ``apply_received(ticket)``.
    Checkpoints are staged as their path and read by the worker when applied.
    """

    def __init__(self, engine: Any, *, timeout_s: float) -> None:
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


class CheckpointFollower:
    """Stages every announced checkpoint (polling the ``current`` announcement); for engines
    that cannot take part in broadcasts. Never registers as a group member."""

    def __init__(self, client: redis.Redis, keys: Any, instance: str, *, poll_s: float) -> None:
        self.client = client
        self.keys = keys
        self.instance = instance
        self.poll_s = poll_s
        self.last_error: str | None = None
        self._latest: WeightAnnouncement | None = None
        self._staged: EngineStaged | None = None
        self._have = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weights-checkpoints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                ann = read_announcement(self.client, self.keys)
            except redis.RedisError as exc:
                self.last_error = f"redis: {exc}"
                continue
            if ann is None:
                continue
            self._latest = ann
            if ann.checkpoint_path and ann.version != self._have:
                with self._lock:
                    self._have = ann.version
                    self._staged = EngineStaged(
                        version=ann.version,
                        step=ann.step,
                        tensors={},
                        source="checkpoint",
                        checkpoint_path=ann.checkpoint_path,
                    )

    def take_staged(self) -> StagedWeights | None:
        with self._lock:
            staged, self._staged = self._staged, None
            return staged

    def report_served(self, version: int) -> None:
        _report_served(self.client, self.keys, self.instance, version)

    def latest_announcement(self) -> WeightAnnouncement | None:
        return self._latest

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def engine_applier(backend: Any) -> Callable[[StagedWeights], None]:
    """How a staged version reaches an engine that holds its own weights."""

    def apply(staged: StagedWeights) -> None:
        path = getattr(staged, "checkpoint_path", None)
        if staged.source == "checkpoint" and path:
            backend.load_checkpoint(path)
        elif isinstance(staged, EngineStaged) and staged.ticket:
            backend.apply_received(staged.ticket)
        else:
            backend.load_weights(staged.tensors.items())

    return apply


def start_engine_sync(
    runtime: ServiceRuntime, settings: GeneratorSettings, backend: Any
) -> WeightSync:
    apply = engine_applier(backend)
    if not backend.receives_broadcast:
        follower = CheckpointFollower(
            runtime.client, runtime.keys, runtime.instance, poll_s=settings.heartbeat_s
        )
        follower.start()
        return WeightSync(follower, apply)
    subscriber = WeightSubscriber(
        runtime.client,
        runtime.keys,
        runtime.instance,
        backend=settings.weight_sync_backend,
        timeout_s=settings.weight_sync_timeout_s,
        heartbeat_s=settings.heartbeat_s,
        # Where the engine's worker receives: it offers NCCL to the learner only on a GPU.
        device=backend.device,
        receiver=EngineReceiver(backend, timeout_s=settings.weight_sync_timeout_s),
    )
    subscriber.start(backend.weight_template)
    return WeightSync(subscriber, apply)


def start_weight_sync(
    runtime: ServiceRuntime, settings: GeneratorSettings, backend: Any
) -> WeightSync:
    """The follower that fits ``backend`` (see the module docstring)."""
    if backend.name == "hf":
        return start_hf_sync(runtime, settings, backend)
    return start_engine_sync(runtime, settings, backend)
