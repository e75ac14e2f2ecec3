"""Prometheus metrics of one api app: requests by route and status, latency, prompts accepted,
and queue depths read from Redis at scrape time.

Each app has its own ``CollectorRegistry`` (tests run several apps in one process); ``conspo
api`` passes the ServiceRuntime's registry, so the same metrics are also served on
``metrics_port`` like every other service's. The route
label is the route's template (``/v1/rollouts/{group_id}``), never the raw path, and unmatched
paths share one label, so a scanner cannot blow up the label cardinality.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from conspo.keys import Keys
from services.api.depths import all_depths

log = logging.getLogger(__name__)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _QueueCollector(Collector):
    def __init__(self, source: Callable[[], tuple[redis.Redis, Keys] | None]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("conspo_api_redis_up", "1 if Redis answered this scrape")
        source = self._source()
        if source is None:
            return
        client, keys = source
        try:
            depths = all_depths(client, keys)
        except redis.RedisError as exc:
            log.debug("metrics: queue depths unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for field, doc in (
            ("length", "Entries in the stream"),
            ("pending", "Delivered, not yet acknowledged"),
            ("lag", "Not yet delivered to the consumer group"),
        ):
            family = GaugeMetricFamily(f"conspo_queue_{field}", doc, labels=["stream"])
            for name, depth in depths.items():
                family.add_metric([name], getattr(depth, field))
            yield family


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "conspo_api_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "conspo_api_request_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.prompts_accepted = Counter(
            "conspo_api_prompts_accepted",
            "Prompts published to the prompts stream (source: request or dataset)",
            ["source"],
            registry=self.registry,
        )
        self._source: tuple[redis.Redis, Keys] | None = None
        self.registry.register(_QueueCollector(lambda: self._source))

    def watch_queues(self, client: redis.Redis, keys: Keys) -> None:
        self._source = (client, keys)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response, including those produced by the auth and size middlewares."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in _METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
