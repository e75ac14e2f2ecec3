"""Queue depths of the run's streams as the api reports them (``conspo.depths`` reads them
without creating anything)."""

from __future__ import annotations

import redis

from conspo import depths
from conspo.keys import Keys
from services.api.schemas import QueueDepth


def all_depths(client: redis.Redis, keys: Keys) -> dict[str, QueueDepth]:
    return {
        name: QueueDepth(length=d.length, pending=d.pending, lag=d.lag)
        for name, d in depths.all_depths(client, keys).items()
    }
