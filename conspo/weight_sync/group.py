"""A stateless weight-sync process group and the push protocol that runs inside it.

Why a hand-built group: ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` are constructed directly on a
``PrefixStore(f"conspo-weights/epoch{epoch}", TCPStore)`` and never registered with
``torch.distributed``'s global state. The learner's own training group (torchrun / FSDP) is left
untouched, and the group can be thrown away and rebuilt whenever membership changes, which
``init_process_group`` / ``new_group`` cannot do (they need every rank of the default group).

One push is, for every rank of the group, the same fixed sequence of collectives:

1. ``broadcast`` of a 16-slot int64 header from rank 0: magic, wire format, epoch, push sequence,
   version, step, layout hash, tensor count, total bytes, bucket bytes. It is also the handshake:
   a receiver checks epoch and sequence (desync), the version it was told to expect, and the
   layout hash before any big transfer.
2. ``all_reduce`` of a status vector (slot r = rank r's verdict: accept or refuse). Everybody then
   knows who refused, and if nobody accepted, the buckets are skipped by every rank alike.
3. One ``broadcast`` per bucket of ``bucket_bytes`` (about 1 GB). Acceptors receive straight into
   their flat staging buffer, refusers into a scratch buffer they throw away: a refusal never
   breaks the collective for the others. The sender packs bucket i+1 while bucket i is in
   flight (two buffers).
4. ``all_reduce`` of a done vector, so that rank 0 reports only receivers that confirmed.

Every collective waits with the group's timeout; any failure (peer died, timeout, desync) marks
the group broken and raises ``GroupError``: a broken group is never used again, the caller
rebuilds one. A ``LayoutMismatchError`` is raised only after the refuser took part in every
collective, so the group stays usable.

NCCL: the same code runs with CUDA tensors (``ProcessGroupNCCL`` with a non-blocking communicator
init and ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` unless set, so a timeout raises instead of killing
the process; every wait passes an explicit timeout, which makes it blocking and bounded). It has
only been exercised with gloo on CPU so far.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from conspo.protocol import Rendezvous
from conspo.weight_sync.layout import (
    BufferPool,
    Layout,
    NamedTensors,
    TensorSource,
    check_matches,
    chunk_bounds,
    copy_bytes,
    effective_bucket_bytes,
    layout_of,
    named_tensors_of,
    pack_into,
    unbucketize,
)

logger = logging.getLogger(__name__)

Backend = Literal["gloo", "nccl"]
DEFAULT_BUCKET_BYTES = 1 << 30
HEADER_SLOTS = 16
MAGIC = 0x434F4E53504F5753  # "CONSPOWS"
WIRE_FORMAT = 1
ACCEPT, REFUSE = 1, 2
_env_lock = threading.Lock()


class WeightSyncError(RuntimeError):
    """Base class of weight-sync failures."""


class GroupError(WeightSyncError):
    """The group failed (peer gone, timeout, desync) and is now broken."""


class LayoutMismatchError(WeightSyncError):
    """The sender's tensors differ from the receiver's template; nothing was staged."""


@dataclass(frozen=True)
class Header:
    epoch: int
    seq: int
    version: int
    step: int
    layout_hash: int
    num_tensors: int
    total_bytes: int
    bucket_bytes: int

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        values = [
            MAGIC,
            WIRE_FORMAT,
            self.epoch,
            self.seq,
            self.version,
            self.step,
            self.layout_hash,
            self.num_tensors,
            self.total_bytes,
            self.bucket_bytes,
        ]
        out = torch.zeros(HEADER_SLOTS, dtype=torch.int64)
        out[: len(values)] = torch.tensor(values, dtype=torch.int64)
        return out.to(device)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> Header:
        v = tensor.to("cpu").tolist()
        if v[0] != MAGIC or v[1] != WIRE_FORMAT:
            raise GroupError(f"not a conspo weight header (magic {v[0]:#x}, format {v[1]})")
        return cls(*(int(x) for x in v[2:10]))


@dataclass(frozen=True)
class BroadcastResult:
    """What rank 0 learns from one push: who accepted, refused and confirmed receipt."""

    header: Header
    accepted: list[int]
    refused: list[int]
    received: list[int]
    seconds: float
    bytes: int


def resolve_backend(backend: str, device: torch.device | str | None) -> Backend:
    """``auto`` picks NCCL for CUDA devices (when this torch build has it), else gloo."""
    if backend in ("gloo", "nccl"):
        return backend  # type: ignore[return-value]
    if backend != "auto":
        raise ValueError(f"unknown backend {backend!r}")
    is_cuda = device is not None and torch.device(device).type == "cuda"
    return "nccl" if is_cuda and dist.is_nccl_available() else "gloo"


def local_address_towards(host: str, port: int) -> str:
    """The local interface address that routes to ``host`` (what gloo must advertise)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, proto=socket.IPPROTO_UDP)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)  # UDP: no packet is sent, only a route lookup
            return str(sock.getsockname()[0])
    except OSError:
        return socket.gethostname()


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Set an env var for the duration of a constructor, unless the user already chose one."""
    with _env_lock:
        had = name in os.environ
        if not had:
            os.environ[name] = value
        try:
            yield
        finally:
            if not had:
                os.environ.pop(name, None)


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(float(seconds), 0.001))


def make_store(host: str, port: int, *, is_master: bool, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store: rank 0 hosts it (port 0 = pick a free one), members connect."""
    return dist.TCPStore(
        host, port, None, is_master, timeout=_timedelta(timeout_s), wait_for_workers=False
    )


def _new_backend(
    backend: Backend,
    store: dist.Store,
    rank: int,
    world_size: int,
    timeout_s: float,
    address: str,
    device: torch.device,
) -> object:
    td = _timedelta(timeout_s)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = td
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=address)]
        return dist.ProcessGroupGloo(store, rank, world_size, opts)
    if not dist.is_nccl_available():
        raise WeightSyncError("this torch build has no NCCL; use backend='gloo'")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = td
    config = getattr(opts, "config", None)
    if config is not None and hasattr(config, "blocking"):
        config.blocking = 0  # non-blocking communicator init, so a missing peer times out
    # The default (3) tears the whole process down on a watchdog timeout: a dead generator would
    # kill the learner. 2 = abort the communicator and raise in the caller instead.
    with _env_default("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"), torch.cuda.device(device):
        return dist.ProcessGroupNCCL(store, rank, world_size, opts)


def open_group(
    rendezvous: Rendezvous,
    rank: int,
    timeout_s: float,
    device: torch.device | str | None = None,
    *,
    store: dist.Store | None = None,
    advertise_host: str | None = None,
    join_timeout_s: float | None = None,
) -> WeightGroup:
    """Join (rank > 0) or host (rank 0) the weight-sync group described by ``rendezvous``.

    Blocks until all ``world_size`` ranks have joined, at most ``join_timeout_s`` (default
    ``timeout_s``, which bounds every collective afterwards); raises ``GroupError`` otherwise.
    Rank 0 joins with a short one: a member that was announced but died never joins, and
    waiting the whole transfer timeout for it is time the run stands still.

    ``store`` lets rank 0 reuse one long-lived ``TCPStore`` across epochs;
    ``advertise_host`` overrides the address gloo advertises to peers (default: the interface
    that routes to the rendezvous host). ``device`` matters for NCCL only (default: current CUDA
    device); gloo groups always work on CPU tensors.
    """
    world = rendezvous.world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a group of {world}")
    if rendezvous.backend == "nccl":
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type != "cuda":
            raise WeightSyncError(f"NCCL needs a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    t0 = time.monotonic()
    join_s = timeout_s if join_timeout_s is None else join_timeout_s
    try:
        if store is None:
            store = make_store(
                rendezvous.host, rendezvous.port, is_master=rank == 0, timeout_s=join_s
            )
        prefixed = dist.PrefixStore(f"conspo-weights/epoch{rendezvous.epoch}", store)
        if rank == 0:
            address = rendezvous.host
        else:
            address = advertise_host or local_address_towards(rendezvous.host, rendezvous.port)
        pg = _new_backend(rendezvous.backend, prefixed, rank, world, join_s, address, dev)
    except Exception as exc:
        raise GroupError(
            f"could not form weight-sync group epoch {rendezvous.epoch} as rank {rank}/{world} "
            f"at {rendezvous.host}:{rendezvous.port} within {join_s:g}s: {exc}"
        ) from exc
    logger.debug(
        "rank %d/%d joined weight-sync epoch %d in %.2fs",
        rank,
        world,
        rendezvous.epoch,
        time.monotonic() - t0,
    )
    return WeightGroup(pg, rendezvous, rank, dev, timeout_s, store)


@dataclass
class _Round:
    header: Header
    mismatch: str | None
    status: list[int] = field(default_factory=list)

    @property
    def any_accept(self) -> bool:
        return any(s == ACCEPT for s in self.status[1:])


class WeightGroup:
    """A formed group; rank 0 sends with ``broadcast_tensors``, the others receive."""

    def __init__(
        self,
        pg: object,
        rendezvous: Rendezvous,
        rank: int,
        device: torch.device,
        timeout_s: float,
        store: object = None,
    ) -> None:
        self.pg = pg
        self.rendezvous = rendezvous
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        self.broken = False
        self.closed = False
        self.last_header: Header | None = None
        self._store = store  # keep the client connection alive with the group
        self._seq = 0

    @property
    def world_size(self) -> int:
        return self.rendezvous.world_size

    @property
    def epoch(self) -> int:
        return self.rendezvous.epoch

    @property
    def backend(self) -> Backend:
        return self.rendezvous.backend

    def __repr__(self) -> str:
        state = "broken" if self.broken else "closed" if self.closed else "ok"
        return f"WeightGroup(epoch={self.epoch}, rank={self.rank}/{self.world_size}, {state})"

    # -- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the group (idempotent); peers blocked on us then fail fast, not by timeout."""
        if self.closed:
            return
        self.closed = True
        method = "abort" if self.broken or self.backend == "nccl" else "shutdown"
        with contextlib.suppress(Exception):
            getattr(self.pg, method)()
        self.pg = None
        self._store = None

    def _fail(self, what: str, exc: BaseException) -> GroupError:
        self.broken = True
        err = GroupError(
            f"weight-sync {what} failed in epoch {self.epoch} "
            f"(rank {self.rank}/{self.world_size}): {exc}"
        )
        self.close()
        return err

    # -- collectives -----------------------------------------------------------------------------
    def _check_usable(self) -> None:
        if self.broken or self.closed:
            raise GroupError(f"{self!r} cannot be used again; open a new group")

    def _wait(self, work: object, what: str) -> None:
        try:
            work.wait(_timedelta(self.timeout_s))  # type: ignore[attr-defined]
        except Exception as exc:
            raise self._fail(what, exc) from exc

    def _start_broadcast(self, tensor: torch.Tensor, what: str) -> object:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = _timedelta(self.timeout_s)
        try:
            return self.pg.broadcast([tensor], opts)  # type: ignore[union-attr]
        except Exception as exc:
            raise self._fail(what, exc) from exc

    def _broadcast(self, tensor: torch.Tensor, what: str) -> None:
        self._wait(self._start_broadcast(tensor, what), what)

    def _vote(self, value: int, what: str) -> list[int]:
        votes = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        votes[self.rank] = value
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        opts.timeout = _timedelta(self.timeout_s)
        try:
            work = self.pg.allreduce([votes], opts)  # type: ignore[union-attr]
        except Exception as exc:
            raise self._fail(what, exc) from exc
        self._wait(work, what)
        return [int(v) for v in votes.to("cpu").tolist()]

    # -- rank 0 ----------------------------------------------------------------------------------
    def broadcast_tensors(
        self,
        named: TensorSource | NamedTensors,
        src: int = 0,
        *,
        version: int = 0,
        step: int = 0,
        layout: Layout | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        pool: BufferPool | None = None,
    ) -> BroadcastResult:
        """Send ``named`` (in order) to every other rank; only rank ``src`` == 0 may call it.

        ``pool`` keeps the two bucket buffers for the next push (see ``BufferPool``)."""
        if src != 0 or self.rank != 0:
            raise ValueError("only rank 0 sends in a weight-sync group")
        self._check_usable()
        items = named_tensors_of(named)
        layout = layout or layout_of(items)
        views = check_matches(items, layout)
        bucket = effective_bucket_bytes(layout.total_bytes, bucket_bytes)
        header = Header(
            self.epoch,
            self._seq,
            version,
            step,
            layout.hash_int,
            layout.num_tensors,
            layout.total_bytes,
            bucket,
        )
        t0 = time.perf_counter()
        self._broadcast(header.to_tensor(self.device), "header broadcast")
        rnd = _Round(header, None, self._vote(ACCEPT, "handshake"))
        if rnd.any_accept:
            bounds = chunk_bounds(layout.total_bytes, bucket)
            pool = pool or BufferPool(0)
            buffers = [pool.get(bucket, self.device) for _ in range(min(2, len(bounds)))]
            pending = None
            for i, (a, b) in enumerate(bounds):
                buf = pack_into(views, layout, a, b, buffers[i % len(buffers)])
                if pending is not None:
                    self._wait(pending, f"bucket {i - 1} broadcast")
                pending = self._start_broadcast(buf, f"bucket {i} broadcast")
            if pending is not None:
                self._wait(pending, f"bucket {len(bounds) - 1} broadcast")
            del buffers
        done = self._vote(ACCEPT, "completion")
        self._seq += 1
        self.last_header = header
        others = range(1, self.world_size)
        return BroadcastResult(
            header=header,
            accepted=[r for r in others if rnd.status[r] == ACCEPT],
            refused=[r for r in others if rnd.status[r] != ACCEPT],
            received=[r for r in others if done[r] == ACCEPT and rnd.status[r] == ACCEPT],
            seconds=time.perf_counter() - t0,
            bytes=layout.total_bytes if rnd.any_accept else 0,
        )

    # -- other ranks -----------------------------------------------------------------------------
    def _begin(self, layout: Layout, expect_version: int | None) -> _Round:
        if self.rank == 0:
            raise ValueError("rank 0 sends; it cannot receive")
        self._check_usable()
        raw = torch.empty(HEADER_SLOTS, dtype=torch.int64, device=self.device)
        self._broadcast(raw, "header broadcast")
        try:
            header = Header.from_tensor(raw)
        except GroupError as exc:
            raise self._fail("header check", exc) from exc
        if header.epoch != self.epoch or header.seq != self._seq:
            desync = f"expected epoch {self.epoch} push {self._seq}, got {header}"
            raise self._fail("handshake", RuntimeError(f"out of step: {desync}"))
        if expect_version is not None and header.version != expect_version:
            wrong = f"announced version {expect_version}, header says {header.version}"
            raise self._fail("handshake", RuntimeError(wrong))
        mismatch = None
        if header.layout_hash != layout.hash_int or header.total_bytes != layout.total_bytes:
            mismatch = (
                f"layout mismatch: the learner sends {header.num_tensors} tensors / "
                f"{header.total_bytes} bytes (layout hash {header.layout_hash:015x}), this model "
                f"has {layout.describe()}; refusing version {header.version}"
            )
        status = self._vote(REFUSE if mismatch else ACCEPT, "handshake")
        return _Round(header, mismatch, status)

    def _finish(self, rnd: _Round) -> None:
        self._vote(REFUSE if rnd.mismatch else ACCEPT, "completion")
        self._seq += 1
        self.last_header = rnd.header
        if rnd.mismatch:
            raise LayoutMismatchError(rnd.mismatch)

    def _sink(self, rnd: _Round) -> None:
        h = rnd.header
        scratch = torch.empty(
            min(h.bucket_bytes, h.total_bytes), dtype=torch.uint8, device=self.device
        )
        for i, (a, b) in enumerate(chunk_bounds(h.total_bytes, h.bucket_bytes)):
            self._broadcast(scratch[: b - a], f"bucket {i} broadcast")

    def receive_flat(
        self,
        layout: Layout,
        *,
        expect_version: int | None = None,
        pool: BufferPool | None = None,
    ) -> tuple[torch.Tensor, Header]:
        """Receive one push into a flat uint8 buffer of ``layout.total_bytes`` (from ``pool``
        when one is given and has a buffer nobody uses any more, else a fresh one)."""
        rnd = self._begin(layout, expect_version)
        flat = torch.empty(0, dtype=torch.uint8, device=self.device)
        if rnd.any_accept:
            if rnd.mismatch:
                self._sink(rnd)
            else:
                flat = (pool or BufferPool(0)).get(layout.total_bytes, self.device)
                h = rnd.header
                for i, (a, b) in enumerate(chunk_bounds(h.total_bytes, h.bucket_bytes)):
                    self._broadcast(flat[a:b], f"bucket {i} broadcast")
        self._finish(rnd)
        return flat, rnd.header

    def receive_tensors(
        self, layout: Layout, *, expect_version: int | None = None
    ) -> list[tuple[str, torch.Tensor]]:
        """Receive one push; returns views into one flat staging buffer, in layout order."""
        flat, _ = self.receive_flat(layout, expect_version=expect_version)
        return unbucketize(flat, layout)

    def iter_receive(
        self, layout: Layout, *, expect_version: int | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Receive one push as a stream of (name, tensor), each valid until the next is taken.

        Memory: one bucket plus tensors that straddle buckets, not a whole model: meant for
        loaders such as vLLM's ``model.load_weights(iterable)`` that copy each tensor at once.
        Nothing is yielded before the handshake succeeded; if the consumer stops early or a
        bucket fails, the group is broken (its peers cannot skip collectives) and the consumer
        must restore a consistent model itself (e.g. from the checkpoint).
        """
        rnd = self._begin(layout, expect_version)
        if rnd.mismatch or not rnd.any_accept:
            if rnd.any_accept:
                self._sink(rnd)
            self._finish(rnd)
            return
        finished = False
        try:
            for spec in layout.specs:
                if spec.nbytes == 0:
                    yield spec.name, torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
            h = rnd.header
            buf = torch.empty(h.bucket_bytes, dtype=torch.uint8, device=self.device)
            partial: dict[int, torch.Tensor] = {}
            for i, (a, b) in enumerate(chunk_bounds(h.total_bytes, h.bucket_bytes)):
                self._broadcast(buf[: b - a], f"bucket {i} broadcast")
                for spec in layout.overlapping(a, b):
                    if spec.nbytes == 0:
                        continue
                    if spec.offset >= a and spec.end <= b:
                        raw = buf[spec.offset - a : spec.end - a]
                    else:
                        whole = partial.get(spec.index)
                        if whole is None:
                            whole = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
                            partial[spec.index] = whole
                        lo, hi = max(spec.offset, a), min(spec.end, b)
                        copy_bytes(whole[lo - spec.offset : hi - spec.offset], buf[lo - a : hi - a])
                        if spec.end > b:
                            continue
                        raw = partial.pop(spec.index)
                    yield spec.name, raw.view(spec.dtype).view(spec.shape)
            self._finish(rnd)
            finished = True
        finally:
            if not finished and not self.broken:
                self._fail("streamed receive", RuntimeError("consumer stopped early"))
