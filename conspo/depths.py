"""Read-only depths of a run's streams, for whoever reports on the run (api, learner).

``StreamQueue.backlog`` creates the stream and its group on first use, which is right for a
producer or consumer but not for a reader that only reports: a status page or the learner's
"why am I waiting" must not create ``rollouts`` or ``labeled``. These read through
``conspo.queue.depths``, which creates nothing and treats a missing stream or group as empty /
all lag.
"""

from __future__ import annotations

import redis

from conspo.keys import Keys
from conspo.protocol import Message
from conspo.queue import Backlog, StreamQueue, depths

STREAMS = ("prompts", "rollouts", "labeled", "dead")


def stream_depth(client: redis.Redis, keys: Keys, name: str) -> Backlog:
    return StreamQueue(client, keys, name, Message).depth()


def all_depths(client: redis.Redis, keys: Keys) -> dict[str, Backlog]:
    queues = [StreamQueue(client, keys, name, Message) for name in STREAMS]
    return dict(zip(STREAMS, depths(queues), strict=True))
