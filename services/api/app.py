"""The FastAPI application factory.

``create_app`` builds one self-contained app: its own Redis client for request paths (unless one
is passed in), its own metrics registry and, if enabled, a dataset feeder thread that lives as
long as the app's lifespan. Nothing is global, so tests run several apps in one process (one
against a closed port to see the 503s) and the embedded demo can start one in a thread.

Middleware order, outermost first: metrics (counts every response, 401 and 413 included), bearer
auth (before anything reads a body), body-size limit, then FastAPI's routing and handlers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from conspo.settings import ApiSettings
from services.api import errors
from services.api.auth import BearerAuthMiddleware
from services.api.context import AppContext, request_client
from services.api.datasets.feeder import DatasetFeeder
from services.api.limits import BodyLimitMiddleware
from services.api.metrics import ApiMetrics, MetricsMiddleware
from services.api.redact import register_secret
from services.api.routes import accounting, dead, health, lineage, prompts, status
from services.api.routes import datasets as dataset_routes

log = logging.getLogger(__name__)

DESCRIPTION = """\
Submit training prompts and datasets to a conspo run and watch it train.

Every `/v1` route needs `Authorization: Bearer <token>`. Every error has the body
`{"error": {"code", "message", "details"}}`.
"""


def create_app(
    settings: ApiSettings,
    client: redis.Redis | None = None,
    *,
    instance: str | None = None,
    on_error: Callable[[str], None] | None = None,
    on_recovered: Callable[[], None] | None = None,
    registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the api. ``client`` defaults to a short-timeout client for ``settings.redis_url``;
    ``instance`` names this replica (feeder lock owner); ``on_error`` receives feeder errors and
    ``on_recovered`` hears when the feeder works again (``main`` passes the heartbeat's
    last-error setter and clearer); ``registry`` receives the metrics (default: a private
    one)."""
    token = settings.api_token.get_secret_value() if settings.api_token is not None else None
    register_secret(token)
    if settings.redis_password is not None:
        register_secret(settings.redis_password.get_secret_value())
    own_client = client is None
    metrics = ApiMetrics(registry)
    ctx = AppContext(settings=settings, client=client or request_client(settings), metrics=metrics)
    if instance:
        ctx.instance = instance
        ctx.incarnation.instance = instance
    try:  # adopt the run's incarnation now, so a later loss is noticed (conspo.incarnation)
        ctx.incarnation.check()
    except redis.RedisError as exc:
        log.warning("could not read the run's incarnation yet: %s", type(exc).__name__)
    metrics.watch_queues(ctx.client, ctx.keys)
    feeder = DatasetFeeder(
        ctx.datasets,
        ctx.prompts,
        owner=ctx.instance,
        max_backlog=settings.feed_max_backlog,
        batch=settings.feed_batch,
        interval_s=settings.feed_interval_s,
        lock_ttl_s=settings.feed_lock_ttl_s,
        on_fed=lambda n: metrics.prompts_accepted.labels("dataset").inc(n),
        on_error=on_error,
        on_recovered=on_recovered,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.feeder_enabled:
            feeder.start()
        log.info("api %s ready (run %s)", ctx.instance, settings.run)
        try:
            yield
        finally:
            feeder.stop(timeout=settings.shutdown_grace_s)
            if own_client:
                ctx.client.close()
            if ctx.aclient is not None:
                await ctx.aclient.aclose()

    app = FastAPI(
        title="conspo api",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.state.feeder = feeder
    errors.install(app)

    for module in (prompts, dataset_routes, status, accounting, lineage, dead, health):
        app.include_router(module.router)

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(BearerAuthMiddleware, token=None if settings.auth_disabled else token)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
