"""GET /v1/accounting: the run's books, where every submitted prompt ended up.

A thin view of ``conspo.accounting`` (the one implementation, shared with the local stack), so a
deployment without access to Redis, such as ``deploy/compose_check.py`` against a ``docker
compose`` stack, can check that nothing was lost or trained twice.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from conspo.accounting import accounting
from services.api.auth import v1_router
from services.api.context import AppContext, get_ctx
from services.api.errors import error_responses
from services.api.schemas import Accounting

router = v1_router(tags=["status"])


@router.get(
    "/accounting",
    response_model=Accounting,
    summary="Where every submitted prompt went: generated, labelled, trained, queued, dead, lost",
    responses=error_responses(401, 503),
)
def run_accounting(ctx: Annotated[AppContext, Depends(get_ctx)]) -> Accounting:
    return Accounting(**accounting(ctx.client, ctx.keys))
