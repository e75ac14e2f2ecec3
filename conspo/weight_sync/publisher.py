"""The learner's side: announce a policy version and broadcast it to the live generators.

Why the learner never waits on one peer: ``push`` takes the live members from Redis, (re)builds
the group only when that set changed or the last push failed, writes the announcement, and runs
one fixed sequence of collectives with a timeout each. A peer that does not join or dies
mid-transfer makes that push fail after at most the timeout: the group is dropped, the members
of the failed group are "suspects" until their registration shows that their sync loop has
processed the failed announcement (so a dead or wedged generator is left out of the next group,
even while its registration is still fresh, and healthy ones rejoin as soon as they report),
and the next push rebuilds with who is left. Peer failures are reported
in the returned ``PushReport``, never raised.

Why a dead generator costs seconds: members say how often they refresh their registration, so
one that stopped (SIGKILL) is no longer live three refreshes later (``membership.member_ttl``);
a group it was part of fails at once (its sockets are closed); and the rendezvous of a rebuilt
group waits ``join_timeout_s`` (short) for members to join, not the transfer timeout. A new or
returning member does not have to wait for the learner's next step either: ``wants_push`` tells
an idle learner that a live member is missing from its group, and it pushes the current version.

Why one long-lived ``TCPStore`` (rather than one per epoch on a new port): the rendezvous address
stays fixed for the learner's lifetime (one port to open in a firewall or a Kubernetes Service),
there is no window where a freshly picked free port is taken by someone else, and the
``PrefixStore`` per epoch already isolates the rounds from one another.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Literal

import redis
import torch
from pydantic import BaseModel, Field

from conspo.keys import Keys
from conspo.protocol import Rendezvous, WeightAnnouncement
from conspo.weight_sync.group import (
    DEFAULT_BUCKET_BYTES,
    WeightGroup,
    WeightSyncError,
    make_store,
    open_group,
    resolve_backend,
)
from conspo.weight_sync.layout import (
    BufferPool,
    Layout,
    TensorSource,
    layout_of,
    named_tensors_of,
)
from conspo.weight_sync.membership import (
    MemberInfo,
    live_members,
    prune_members,
    read_announcement,
    write_announcement,
)

logger = logging.getLogger(__name__)


class PushReport(BaseModel):
    """The outcome of one ``WeightPublisher.push``."""

    ok: bool
    version: int
    step: int
    transport: Literal["broadcast", "checkpoint"]
    epoch: int | None = None
    rebuilt: bool = False
    receivers: list[str] = Field(default_factory=list)
    skipped: dict[str, str] = Field(
        default_factory=dict, description="Live members that did not get this push, and why."
    )
    seconds: float = 0.0
    transfer_seconds: float = 0.0
    bytes: int = 0
    gbps: float = Field(0.0, description="GB/s (1e9 bytes/s) over the whole push.")
    error: str | None = None


class WeightPublisher:
    """Rank 0 of the weight-sync group; one per learner (on the learner's rank 0)."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        backend: Literal["auto", "gloo", "nccl"] = "auto",
        timeout_s: float = 60.0,
        member_ttl_s: float = 15.0,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        join_timeout_s: float | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.host = host
        self.backend = backend
        self.timeout_s = timeout_s
        self.join_timeout_s = (
            timeout_s if join_timeout_s is None else min(join_timeout_s, timeout_s)
        )
        self.member_ttl_s = member_ttl_s
        self.bucket_bytes = bucket_bytes
        self._store = make_store(host, port, is_master=True, timeout_s=timeout_s)
        self.port = int(self._store.port)
        previous = read_announcement(client, keys)
        # A restarted learner continues the epoch sequence so no generator mistakes the new
        # group for the one it may still hold.
        self._next_epoch = previous.rendezvous.epoch + 1 if previous and previous.rendezvous else 0
        self._group: WeightGroup | None = None
        self._group_key: tuple[tuple[str, str], ...] = ()
        self._suspects: dict[str, tuple[float, str]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._pool = BufferPool(2)  # the two bucket buffers, kept between pushes
        self._lock = threading.Lock()
        self._closed = False
        logger.info("weight publisher listening on %s:%d", host, self.port)

    # -- public ----------------------------------------------------------------------------------
    @property
    def epoch(self) -> int | None:
        return self._group.epoch if self._group is not None else None

    @property
    def members(self) -> list[str]:
        return [name for name, _ in self._group_key]

    def push(
        self,
        named_tensors: TensorSource,
        *,
        version: int,
        step: int,
        checkpoint_path: str | None = None,
    ) -> PushReport:
        """Announce ``version`` and broadcast it to every live member; never raises for peers."""
        with self._lock:
            if self._closed:
                raise RuntimeError("WeightPublisher is closed")
            t0 = time.perf_counter()
            items = named_tensors_of(named_tensors)
            layout = layout_of(items)
            report = self._push(items, layout, version, step, checkpoint_path)
            report.seconds = time.perf_counter() - t0
            report.gbps = report.bytes / report.seconds / 1e9 if report.seconds > 0 else 0.0
            log = logger.info if report.ok else logger.warning
            log(
                "weight push v%d: ok=%s %s epoch=%s receivers=%s %.0f MB in %.3fs%s%s",
                version,
                report.ok,
                report.transport,
                report.epoch,
                report.receivers,
                report.bytes / 1e6,
                report.seconds,
                f" skipped={report.skipped}" if report.skipped else "",
                f" error={report.error}" if report.error else "",
            )
            return report

    def wants_push(self, layout_hash: str, backend: str) -> list[str]:
        """Live, eligible members that the current group does not reach (joined or returned
        since the last push); empty when a push would change nothing. One HGETALL and TIME."""
        with self._lock:
            if self._closed:
                return []
            members = live_members(self.client, self.keys, self.member_ttl_s)
            eligible, _ = self._eligible(members, layout_hash, backend, quiet=True)
            reached = dict(self._group_key) if self._group is not None else {}
            return [n for n in eligible if reached.get(n) != members[n].incarnation]

    def close(self) -> None:
        """Leave the group and stop hosting the rendezvous; the announcement stays in Redis."""
        with self._lock:
            self._closed = True
            self._drop_group()
            self._pool.clear()
            self._store = None

    def __enter__(self) -> WeightPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------
    def _push(
        self,
        items: list[tuple[str, torch.Tensor]],
        layout: Layout,
        version: int,
        step: int,
        checkpoint_path: str | None,
    ) -> PushReport:
        backend = resolve_backend(self.backend, items[0][1].device if items else None)
        base = {"version": version, "step": step}
        try:
            members = live_members(self.client, self.keys, self.member_ttl_s)
            prune_members(self.client, self.keys, max(10 * self.member_ttl_s, 60.0))
        except redis.RedisError as exc:
            return PushReport(ok=False, transport="broadcast", error=f"redis: {exc}", **base)
        eligible, skipped = self._eligible(members, layout.hash, backend)

        def announce(**fields: object) -> float:
            ann = WeightAnnouncement(
                version=version,
                step=step,
                checkpoint_path=checkpoint_path,
                num_params=layout.num_params,
                num_bytes=layout.total_bytes,
                layout_hash=layout.hash,
                **fields,  # type: ignore[arg-type]
            )
            write_announcement(self.client, self.keys, ann)
            return ann.created_at

        if not eligible:
            self._drop_group()
            transport = "checkpoint" if checkpoint_path else "broadcast"
            try:
                announce(transport=transport, rendezvous=None)
            except redis.RedisError as exc:
                return PushReport(ok=False, transport=transport, error=f"redis: {exc}", **base)
            return PushReport(ok=True, transport=transport, skipped=skipped, **base)

        key = tuple((name, members[name].incarnation) for name in eligible)
        group = self._group
        rebuild = group is None or group.broken or key != self._group_key
        rebuild = rebuild or (group is not None and group.backend != backend)
        if rebuild:
            self._drop_group()
            epoch = self._next_epoch
            self._next_epoch += 1
        else:
            assert group is not None
            epoch = group.epoch
        names = [name for name, _ in key]
        rendezvous = Rendezvous(
            host=self.host,
            port=self.port,
            world_size=len(names) + 1,
            epoch=epoch,
            backend=backend,
            members=names,
        )
        report = PushReport(ok=False, transport="broadcast", epoch=epoch, rebuilt=rebuild, **base)
        report.bytes = layout.total_bytes
        try:
            announced_at = announce(transport="broadcast", rendezvous=rendezvous)
        except redis.RedisError as exc:
            report.error = f"redis: {exc}"
            return report
        try:
            if rebuild:
                device = next((t.device for _, t in items if t.is_cuda), None)
                group = open_group(
                    rendezvous,
                    0,
                    self.timeout_s,
                    device,
                    store=self._store,
                    join_timeout_s=self.join_timeout_s,
                )
                self._group, self._group_key = group, key
            assert group is not None
            result = group.broadcast_tensors(
                items,
                version=version,
                step=step,
                layout=layout,
                bucket_bytes=self.bucket_bytes,
                pool=self._pool,
            )
        except WeightSyncError as exc:
            self._drop_group()
            for name, incarnation in key:
                self._suspects[name] = (announced_at, incarnation)
            report.error = str(exc)
            report.skipped = {**skipped, **dict.fromkeys(names, "push failed")}
            return report
        report.ok = True
        report.transfer_seconds = result.seconds
        report.bytes = result.bytes
        report.receivers = [names[r - 1] for r in result.received]
        for r in result.refused:
            skipped[names[r - 1]] = "refused: layout mismatch"
        for r in set(result.accepted) - set(result.received):
            skipped[names[r - 1]] = "did not confirm receipt"
        report.skipped = skipped
        return report

    def _eligible(
        self, members: dict[str, MemberInfo], layout_hash: str, backend: str, quiet: bool = False
    ) -> tuple[list[str], dict[str, str]]:
        eligible, skipped = [], {}
        for name in list(self._suspects):
            if name not in members:
                del self._suspects[name]
        for name, info in sorted(members.items()):
            if info.layout_hash != layout_hash:
                skipped[name] = f"layout mismatch: member {info.layout_hash}, learner {layout_hash}"
                if not quiet and (name, info.layout_hash) not in self._warned:
                    self._warned.add((name, info.layout_hash))
                    logger.error("generator %s: %s (left out)", name, skipped[name])
                continue
            if backend not in info.backends:
                skipped[name] = f"cannot use backend {backend} (offers {info.backends})"
                continue
            suspect = self._suspects.get(name)
            if suspect is not None:
                failed_at, incarnation = suspect
                if info.incarnation == incarnation and info.seen_at < failed_at:
                    skipped[name] = "in the last failed push; waiting for it to report back"
                    continue
                if not quiet:
                    del self._suspects[name]
            eligible.append(name)
        return eligible, skipped

    def _drop_group(self) -> None:
        if self._group is not None:
            self._group.close()
        self._group, self._group_key = None, ()
