"""GET /v1/dead: the newest dead letters, without their payloads (which may be large or hold
prompt text an operator listing failures does not need)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query

from conspo.queue import parse_entry_id
from services.api.auth import v1_router
from services.api.context import AppContext, get_ctx
from services.api.errors import ApiError, error_responses
from services.api.routes.lineage import dead_letter_view
from services.api.schemas import DeadList

router = v1_router(tags=["dead letters"])


@router.get(
    "/dead",
    response_model=DeadList,
    summary="Recent dead letters (source, entry id, reason, deliveries), newest first",
    responses=error_responses(401, 422, 503),
)
def list_dead(
    ctx: Annotated[AppContext, Depends(get_ctx)],
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    before: Annotated[
        str | None,
        Query(pattern=r"^\d{1,20}-\d{1,20}$", description="Only letters older than this id."),
    ] = None,
) -> DeadList:
    if before is not None and parse_entry_id(before) is None:
        raise ApiError(422, "validation_error", f"{before!r} is not a stream entry id")
    items = [dead_letter_view(e) for e in ctx.dead.newest(limit, before=before)]
    next_before = items[-1].dead_entry_id if len(items) == limit else None
    return DeadList(items=items, count=len(items), next_before=next_before)
