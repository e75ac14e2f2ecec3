"""Read-only depths of a run's streams, for whoever reports on the run (api, learner).

``StreamQueue.backlog`` creates the stream and its group on first use, which is right for a
producer or consumer but not for a reader that only reports: a status page or the learner's
"why am I waiting" must not create ``rollouts`` or ``labeled``. This reads XLEN and XINFO GROUPS
and treats a missing stream or group as empty / all lag.
"""

from __future__ import annotations

import redis

from conspo.keys import STREAM_GROUPS, Keys
from conspo.queue import Backlog

STREAMS = ("prompts", "rollouts", "labeled", "dead")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _next_id(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def stream_depth(client: redis.Redis, keys: Keys, name: str) -> Backlog:
    key = keys.stream(name)
    length = int(client.xlen(key))
    group = STREAM_GROUPS.get(name)
    if not group:
        return Backlog(length=length, pending=0, lag=0)
    try:
        groups = client.xinfo_groups(key)
    except redis.ResponseError:  # no such stream yet
        return Backlog(length=length, pending=0, lag=length)
    info = next((g for g in groups if _s(g["name"]) == group), None)
    if info is None:
        return Backlog(length=length, pending=0, lag=length)
    lag = info.get("lag")
    if lag is None:  # Redis < 7, or lag not computable after XDEL
        last = _s(info["last-delivered-id"])
        lag = len(client.xrange(key, min=_next_id(last), max="+", count=100_000))
    return Backlog(length=length, pending=int(info["pending"]), lag=max(0, int(lag)))


def all_depths(client: redis.Redis, keys: Keys) -> dict[str, Backlog]:
    return {name: stream_depth(client, keys, name) for name in STREAMS}
