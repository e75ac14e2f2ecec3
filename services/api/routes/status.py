"""GET /v1/runs/current (alias /v1/status): the run at a glance.

Everything here is read from Redis, so any replica answers the same. Instances whose heartbeat
is older than three heartbeat intervals (or that said they stopped) are listed as ``gone``, not
hidden: a crashed generator stays visible with its last error. Every string other processes wrote
(state fields, errors, heartbeat info) passes through ``redact`` on the way out. When Redis lost
the run's state (``conspo.incarnation``), ``status`` says ``redis_state_lost`` and
``redis_state_detail`` says why, instead of an empty run looking ``idle``. ``waiting`` is the
learner's own account of why no step is happening (``conspo.state.Waiting``), lifted out of the
state hash.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from fastapi import Depends, Query

from conspo.state import WAITING_FIELD, Waiting, parse_waiting
from conspo.weight_sync.membership import read_sync_state
from services.api.auth import v1_router
from services.api.context import AppContext, get_ctx
from services.api.depths import all_depths
from services.api.errors import error_responses
from services.api.redact import MASK, is_secret_name, redact, redact_mapping
from services.api.schemas import (
    Curves,
    ReplicaSummary,
    RunStatus,
    ServiceInstance,
    WeightsView,
)

router = v1_router(tags=["status"])
ALIVE_INTERVALS = 3


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _weights(ctx: AppContext) -> WeightsView:
    state = read_sync_state(ctx.client, ctx.keys)
    announced = state.announcement
    return WeightsView(
        current_version=announced.version if announced is not None else None,
        served=dict(state.served),
    )


def _services(ctx: AppContext) -> tuple[list[ServiceInstance], dict[str, ReplicaSummary]]:
    now = time.time()
    horizon = ALIVE_INTERVALS * ctx.settings.heartbeat_s
    instances: list[ServiceInstance] = []
    replicas: dict[str, ReplicaSummary] = {}
    for beat in ctx.store.heartbeats():
        age = max(0.0, now - beat.at)
        alive = age <= horizon and beat.status not in ("stopped", "failed")
        instances.append(
            ServiceInstance(
                service=beat.service,
                instance=beat.instance,
                host=beat.host,
                pid=beat.pid,
                status=beat.status,
                alive=alive,
                state="alive" if alive else "gone",
                age_s=round(age, 3),
                last_error=redact(beat.last_error) if beat.last_error else None,
                info=redact_mapping(dict(beat.info)),
            )
        )
        summary = replicas.setdefault(beat.service, ReplicaSummary(alive=0, gone=0, instances=[]))
        summary.instances.append(beat.instance)
        if alive:
            summary.alive += 1
        else:
            summary.gone += 1
    return instances, replicas


def _clean_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a diverged loss shows as null
    return value


def _series(ctx: AppContext, name: str, points: int) -> list[dict[str, Any]]:
    """Learning-curve points (JSON objects the learner appends); garbage entries are skipped."""
    return [
        {
            str(k): MASK if is_secret_name(str(k)) else _clean_value(v)
            for k, v in point.items()
            if isinstance(v, int | float | str | bool) or v is None
        }
        for point in ctx.store.series(name, points)
    ]


def _waiting(raw: str | None) -> Waiting | None:
    waiting = parse_waiting(raw) if raw else None
    if waiting is None:
        return None
    return waiting.model_copy(update={"reason": redact(waiting.reason)[:2000]})


def run_status(ctx: AppContext, points: int) -> RunStatus:
    incarnation = ctx.incarnation.check()
    raw_fields = ctx.store.fields()
    waiting = _waiting(raw_fields.pop(WAITING_FIELD, None))
    fields = redact_mapping(raw_fields)
    curves = Curves(train=_series(ctx, "train", points), eval=_series(ctx, "eval", points))
    services, replicas = _services(ctx)
    return RunStatus(
        run=ctx.settings.run,
        status="redis_state_lost" if incarnation.lost else fields.get("status", "idle"),
        redis_state="lost" if incarnation.lost else "ok",
        redis_state_detail=redact(incarnation.detail) if incarnation.detail else None,
        step=_int(fields.get("step")),
        policy_version=_int(fields.get("policy_version")),
        waiting=waiting,
        fields=fields,
        counters=ctx.store.counters(),
        curves=curves,
        queues=all_depths(ctx.client, ctx.keys),
        services=services,
        replicas=replicas,
        weights=_weights(ctx),
        generated_at=time.time(),
    )


Points = Annotated[int, Query(ge=1, le=10_000, description="Last N points of each curve.")]
_DOC = dict(
    response_model=RunStatus,
    responses=error_responses(401, 422, 503),
)


@router.get("/runs/current", summary="Run status, counters, curves, queues, replicas", **_DOC)
def current_run(ctx: Annotated[AppContext, Depends(get_ctx)], points: Points = 1000) -> RunStatus:
    return run_status(ctx, points)


@router.get("/status", summary="Alias of /v1/runs/current", **_DOC)
def status_alias(ctx: Annotated[AppContext, Depends(get_ctx)], points: Points = 1000) -> RunStatus:
    return run_status(ctx, points)
