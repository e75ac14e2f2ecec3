"""Queue depths of the run's streams as the api reports them (``conspo.depths`` reads them
without creating anything)."""

from __future__ import annotations

import redis

from conspo import depths
from conspo.keys import Keys
from services.api.schemas import QueueDepth


def stream_depth(client: redis.Redis, keys: Keys, name: str) -> QueueDepth:
    d = depths.stream_depth(client, keys, name)
    return QueueDepth(length=d.length, pending=d.pending, lag=d.lag)


def all_depths(client: redis.Redis, keys: Keys) -> dict[str, QueueDepth]:
    return {name: stream_depth(client, keys, name) for name in depths.STREAMS}
