"""Open endpoints: liveness, readiness (Redis reachable), Prometheus metrics."""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from services.api.context import AppContext, get_ctx
from services.api.errors import ApiError, error_responses
from services.api.metrics import CONTENT_TYPE
from services.api.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Ready to serve: Redis answers",
    responses=error_responses(503),
)
def readyz(ctx: Annotated[AppContext, Depends(get_ctx)]) -> Ready:
    try:
        ctx.client.ping()
    except redis.RedisError as exc:
        raise ApiError(
            503,
            "redis_unavailable",
            f"the run's Redis does not answer ({type(exc).__name__})",
            headers={"Retry-After": "5"},
        ) from None
    return Ready()


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def metrics(ctx: Annotated[AppContext, Depends(get_ctx)]) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)
