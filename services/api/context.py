"""What every request handler needs, built once per app: settings, Redis, queues, metrics.

Request paths use their own Redis client with a short socket timeout and a single retry (for a
pooled connection that went stale across a Redis restart), not ``ServiceRuntime``'s client: that
one retries for about 30 s, which is right for a worker loop and wrong for an HTTP request. With
Redis down a request fails within ``redis_timeout_s`` and the error handlers turn it into a 503.

Two such clients: the sync one for routes that run in the thread pool, and an async one
(``redis.asyncio``, same settings, its own connection pool) for ``POST /v1/prompts``, the route
clients call at high rates: it runs on the event loop, so a request costs no thread hand-off and
many requests wait on Redis at once (issue 18).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from fastapi import Request
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from conspo.incarnation import Incarnation
from conspo.keys import Keys
from conspo.protocol import DeadLetter, M, Prompt
from conspo.queue import StreamQueue, consumer_name
from conspo.settings import ApiSettings
from conspo.state import RunStore
from services.api.admission import Admission
from services.api.datasets.store import DatasetStore
from services.api.metrics import ApiMetrics
from services.api.publish import PromptPublisher


def _options(settings: ApiSettings) -> dict[str, object]:
    """What both request clients share: short timeouts, one retry on a stale connection, auth."""
    kwargs: dict[str, object] = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": settings.redis_timeout_s,
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        "health_check_interval": 10,
    }
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    return kwargs


def request_aclient(settings: ApiSettings) -> aioredis.Redis:
    """The async twin of ``request_client``: connects on first use, in the serving loop."""
    return aioredis.Redis.from_url(
        settings.redis_url, retry=AsyncRetry(NoBackoff(), 1), **_options(settings)
    )


def request_client(settings: ApiSettings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url, retry=Retry(NoBackoff(), 1), **_options(settings)
    )


@dataclass
class AppContext:
    settings: ApiSettings
    client: redis.Redis
    metrics: ApiMetrics
    instance: str = field(default_factory=lambda: consumer_name("api"))
    aclient: aioredis.Redis | None = None  # default: ``request_aclient(settings)``

    def __post_init__(self) -> None:
        self.keys: Keys = self.settings.keys
        if self.aclient is None:
            self.aclient = request_aclient(self.settings)
        self.store = RunStore(self.client, self.keys)
        self.prompts: StreamQueue[Prompt] = StreamQueue(
            self.client,
            self.keys,
            "prompts",
            Prompt,
            max_entry_bytes=self.settings.max_entry_bytes,
        )
        self.dead: StreamQueue[DeadLetter] = self.queue("dead", DeadLetter)
        self.publisher = PromptPublisher(
            self.prompts, self.settings.idempotency_ttl_s, self.aclient
        )
        self.datasets = DatasetStore(self.client, self.keys)
        self.incarnation = Incarnation(self.client, self.keys, self.instance)
        self.admission: Admission | None = None  # the last one read (routes.prompts.admit)

    def queue(self, stream: str, kind: type[M]) -> StreamQueue[M]:
        """A reader of one of the run's streams (nothing is created by reading)."""
        return StreamQueue(
            self.client, self.keys, stream, kind, max_entry_bytes=self.settings.max_entry_bytes
        )


async def get_ctx(request: Request) -> AppContext:
    # async although it awaits nothing: FastAPI runs a sync dependency in its thread pool, a
    # thread hand-off per request for one attribute read.
    return request.app.state.ctx
