"""Noticing that Redis lost the run's state, so that the loss is reported instead of silent.

Redis is the only shared state. With persistence (AOF) a restart keeps every stream, consumer
group and marker; without it, or after a FLUSHALL or an eviction, the run's keys are simply gone,
and every service would carry on against empty streams: the api would report an ``idle`` run,
counters would restart from zero, and nothing would say that work vanished.

The run's *incarnation* is a random token stored under ``Keys.incarnation`` the first time any
service (or the api) of the run talks to Redis (``SET NX``: whoever comes first writes it, the
others adopt it). Each process remembers the token it adopted and compares it on every heartbeat.
A missing or different value means the state the process was working with is gone. The process
then replaces the value with a tombstone ``lost:<old token>:<unix time>:<instance>`` (so that a
process that starts afterwards, or one that had adopted a fresh token, learns it too: the loss
is sticky until an operator starts the run afresh), and reports it: ``check`` returns a lost
``IncarnationState`` with a reason that starts with ``redis state lost``.

Why a token rather than, say, checking that the streams exist: every key of a run can
legitimately be absent (a fresh run, trimmed streams, a run that never got prompts), but the
token is written before anything else and never removed by the pipeline itself.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from conspo.keys import Keys
from conspo.redis_conn import as_text

log = logging.getLogger(__name__)

TOMBSTONE = "lost:"
LOST = "redis state lost"


@dataclass(frozen=True)
class IncarnationState:
    """``lost``: the state this process adopted is gone; ``detail`` says how; ``detections``:
    how many times this process noticed (at most once per adopted incarnation)."""

    token: str | None
    lost: bool = False
    detail: str | None = None
    detections: int = 0


def _get(client: redis.Redis, key: str) -> str | None:
    raw = client.get(key)
    return None if raw is None else as_text(raw)


class Incarnation:
    """One process's view of the run's incarnation (thread-safe: the api checks it from
    request threads, services from their heartbeat thread)."""

    def __init__(self, client: redis.Redis, keys: Keys, instance: str) -> None:
        self.client = client
        self.key = keys.incarnation
        self.instance = instance
        self.state = IncarnationState(token=None)
        self._lock = threading.Lock()

    def check(self) -> IncarnationState:
        """Adopt the run's incarnation (first call) or compare with it; raises ``RedisError``
        when Redis does not answer (that is an outage, not a loss)."""
        with self._lock:
            return self._check()

    def _check(self) -> IncarnationState:
        if self.state.lost:
            return self.state  # sticky for the life of the process
        if self.state.token is None:
            candidate = uuid.uuid4().hex
            self.client.set(self.key, candidate, nx=True)
            current = _get(self.client, self.key)
            if current is None or current.startswith(TOMBSTONE):
                return self._lost(current, "the run was already marked as lost")
            self.state = IncarnationState(token=current)
            return self.state
        current = _get(self.client, self.key)
        if current == self.state.token:
            return self.state
        if current is None:
            why = "the run's incarnation key vanished (Redis restarted without persistence, or "
            why += "was flushed, or evicted the key)"
        elif current.startswith(TOMBSTONE):
            why = "another process found the run's state gone"
        else:
            why = "the run's incarnation changed (its state was wiped and started again)"
        return self._lost(current, why)

    def _lost(self, current: str | None, why: str) -> IncarnationState:
        old = self.state.token
        if current is None or not current.startswith(TOMBSTONE):
            tombstone = f"{TOMBSTONE}{old or '?'}:{time.time():.0f}:{self.instance}"
            try:
                self.client.set(self.key, tombstone)
            except redis.RedisError as exc:  # reported anyway; the next process will retry
                log.warning("could not mark the run as lost: %s", exc)
        detail = f"{LOST}: {why}; what was in flight is gone (incarnation {old or 'unknown'}"
        detail += f", now {current!r})" if current is not None else ")"
        self.state = IncarnationState(
            token=old, lost=True, detail=detail, detections=self.state.detections + 1
        )
        return self.state
