"""The run's shared state in Redis: status, counters, heartbeats and learning-curve points.

Counters are HINCRBY on one hash so any replica can add to them without coordination; the api
reads the whole hash in one call. Heartbeats carry each instance's status and last error, and an
instance whose heartbeat is older than a few intervals is reported as gone, not deleted, so a
crash stays visible; only after ``forget_gone_after_s`` is its heartbeat forgotten.

``waiting`` (a JSON ``Waiting`` in the state hash) is the learner's own account of why no step is
happening; it is written while the learner waits longer than ``waiting_after_s`` and deleted by
the next step, so the api can show it without knowing anything about the learner's internals.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Mapping
from typing import Any

import redis
from pydantic import BaseModel, Field, ValidationError

from conspo.keys import Keys
from conspo.protocol import DecodeError, Heartbeat, decode, encode
from conspo.redis_conn import as_text
from conspo.settings import RunSettings

WAITING_FIELD = "waiting"
POLICY_VERSION_FIELD = "policy_version"  # the learner's version: what generators must serve


class Waiting(BaseModel):
    """Why a service is not making progress, published while it lasts."""

    service: str = Field(description="Who is waiting (today only the learner says it).")
    code: str = Field(
        description="Short machine-readable cause: `all_equal_rewards`, `stale`, `no_data`, "
        "`filling`."
    )
    reason: str = Field(description="One human sentence with the numbers.")
    since: float = Field(description="Unix seconds: when the wait began.")


def is_alive(beat: Heartbeat, horizon_s: float, now: float | None = None) -> bool:
    """The api's rule: a beat younger than ``horizon_s`` from an instance that did not stop."""
    now = time.time() if now is None else now
    return now - beat.at <= horizon_s and beat.status not in ("stopped", "failed")


class RunStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    # -- counters --------------------------------------------------------------------------------
    def incr(self, counts: Mapping[str, int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, n in counts.items():
            if n:
                pipe.hincrby(self.keys.counters, name, int(n))
        pipe.execute()

    def counters(self) -> dict[str, int]:
        """Every counter (``conspo.counters``); a value that is not an integer (a foreign
        writer) is left out rather than breaking the reader."""
        out = {}
        for name, value in self.client.hgetall(self.keys.counters).items():
            with contextlib.suppress(ValueError):
                out[as_text(name)] = int(value)
        return out

    def counter(self, name: str) -> int:
        raw = self.client.hget(self.keys.counters, name)
        try:
            return int(raw) if raw is not None else 0
        except ValueError:
            return 0

    # -- status fields ---------------------------------------------------------------------------
    def set_fields(self, **fields: str | int | float) -> None:
        self.client.hset(self.keys.state, mapping={k: str(v) for k, v in fields.items()})

    def fields(self) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.client.hgetall(self.keys.state).items()}

    def set_waiting(self, waiting: Waiting) -> None:
        self.client.hset(self.keys.state, WAITING_FIELD, waiting.model_dump_json())

    def clear_waiting(self) -> None:
        self.client.hdel(self.keys.state, WAITING_FIELD)

    def waiting(self) -> Waiting | None:
        raw = self.client.hget(self.keys.state, WAITING_FIELD)
        return parse_waiting(raw) if raw is not None else None

    def announce_run(self, run: RunSettings) -> None:
        """The learner, at start-up: what every generator must match (see ``RunSettings``)."""
        self.client.hset(self.keys.state, mapping={k: str(v) for k, v in run.model_dump().items()})

    def announced_run(self) -> RunSettings | None:
        """What the learner announced; None before it has (or for a foreign writer's values)."""
        names = list(RunSettings.model_fields)
        values = dict(zip(names, self.client.hmget(self.keys.state, names), strict=True))
        if any(v is None for v in values.values()):
            return None
        try:
            return RunSettings(**{k: as_text(v) for k, v in values.items()})
        except ValidationError:
            return None

    def policy_version(self) -> int:
        raw = self.client.hget(self.keys.state, POLICY_VERSION_FIELD)
        return int(raw) if raw is not None else 0

    # -- heartbeats ------------------------------------------------------------------------------
    def heartbeat(self, beat: Heartbeat) -> None:
        self.client.hset(self.keys.heartbeats, f"{beat.service}:{beat.instance}", encode(beat))

    def heartbeats(self) -> list[Heartbeat]:
        beats = []
        for raw in self.client.hgetall(self.keys.heartbeats).values():
            try:
                beats.append(decode(raw, Heartbeat))
            except DecodeError:
                continue  # a foreign writer must not break the status page
        return sorted(beats, key=lambda b: (b.service, b.instance))

    def alive(self, service: str, horizon_s: float) -> list[Heartbeat]:
        now = time.time()
        return [
            b for b in self.heartbeats() if b.service == service and is_alive(b, horizon_s, now)
        ]

    def forget_stale(self, older_than_s: float) -> int:
        """Drop heartbeats older than ``older_than_s`` (``ServiceRuntime.forget_the_long_gone``)."""
        now = time.time()
        stale = [
            f"{b.service}:{b.instance}" for b in self.heartbeats() if now - b.at > older_than_s
        ]
        if stale:
            self.client.hdel(self.keys.heartbeats, *stale)
        return len(stale)

    # -- learning-curve series -------------------------------------------------------------------
    def append_point(
        self, series: str, point: Mapping[str, float | int], cap: int = 10_000
    ) -> None:
        key = self.keys.metrics_series(series)
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(key, json.dumps(dict(point)))
        pipe.ltrim(key, -cap, -1)
        pipe.execute()

    def series(self, series: str, last: int = 1000) -> list[dict[str, Any]]:
        """The last ``last`` points; entries that are not JSON objects are skipped."""
        out = []
        for raw in self.client.lrange(self.keys.metrics_series(series), -last, -1):
            try:
                point = json.loads(raw)
            except ValueError:
                continue
            if isinstance(point, dict):
                out.append(point)
        return out


def parse_waiting(raw: bytes | str) -> Waiting | None:
    """A ``Waiting`` from the state hash; None for anything a foreign writer left there."""
    try:
        return Waiting.model_validate_json(raw)
    except (ValidationError, ValueError):
        return None
