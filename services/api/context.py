"""What every request handler needs, built once per app: settings, Redis, queues, metrics.

Request paths use their own Redis client with a short socket timeout and a single retry (for a
pooled connection that went stale across a Redis restart), not ``ServiceRuntime``'s client: that
one retries for about 30 s, which is right for a worker loop and wrong for an HTTP request. With
Redis down a request fails within ``redis_timeout_s`` and the error handlers turn it into a 503.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from fastapi import Request
from redis.backoff import NoBackoff
from redis.retry import Retry

from conspo.incarnation import Incarnation
from conspo.keys import Keys
from conspo.protocol import DeadLetter, M, Prompt
from conspo.queue import StreamQueue, consumer_name
from conspo.settings import ApiSettings
from conspo.state import RunStore
from services.api.datasets.store import DatasetStore
from services.api.metrics import ApiMetrics
from services.api.publish import PromptPublisher


def request_client(settings: ApiSettings) -> redis.Redis:
    kwargs: dict[str, object] = {}
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.redis_username:
        kwargs["username"] = settings.redis_username
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=10,
        **kwargs,
    )


@dataclass
class AppContext:
    settings: ApiSettings
    client: redis.Redis
    metrics: ApiMetrics
    instance: str = field(default_factory=lambda: consumer_name("api"))

    def __post_init__(self) -> None:
        self.keys: Keys = self.settings.keys
        self.store = RunStore(self.client, self.keys)
        self.prompts: StreamQueue[Prompt] = StreamQueue(
            self.client,
            self.keys,
            "prompts",
            Prompt,
            max_entry_bytes=self.settings.max_entry_bytes,
        )
        self.dead: StreamQueue[DeadLetter] = self.queue("dead", DeadLetter)
        self.publisher = PromptPublisher(self.prompts, self.settings.idempotency_ttl_s)
        self.datasets = DatasetStore(self.client, self.keys)
        self.incarnation = Incarnation(self.client, self.keys, self.instance)

    def queue(self, stream: str, kind: type[M]) -> StreamQueue[M]:
        """A reader of one of the run's streams (nothing is created by reading)."""
        return StreamQueue(
            self.client, self.keys, stream, kind, max_entry_bytes=self.settings.max_entry_bytes
        )


def get_ctx(request: Request) -> AppContext:
    return request.app.state.ctx
