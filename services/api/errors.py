"""One error body for every failure the api reports, whatever raised it.

Clients get ``{"error": {"code", "message", "details"}}`` for our own refusals (``ApiError``),
FastAPI's request validation (422, or 400 for malformed JSON), Starlette's 404/405, Redis outages
(503) and anything unexpected (500, without the exception text). One shape means a client needs
one parser, and the OpenAPI schema can declare the same ``ErrorBody`` for every 4xx/5xx.

Redis connection and timeout errors become 503 with a reason: the request-path client has a
short timeout and no long retry (see ``services.api.context``), so an outage answers quickly.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.redact import redact
from services.api.schemas import ErrorBody, ErrorDetail, ErrorInfo

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


UNION_TAGS = frozenset({"single", "batch"})


class ApiError(Exception):
    """A refusal with a status, a stable machine-readable code and a human reason."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(
        error=ErrorInfo(
            code=code,
            message=message,
            details=[ErrorDetail.model_validate(d) for d in (details or [])],
        )
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def validation_details(errors: list[dict[str, Any]], limit: int = 50) -> list[dict[str, Any]]:
    """Pydantic / FastAPI errors as ``{"loc", "msg", "type"}`` items, without echoing input."""
    out = []
    for err in errors[:limit]:
        loc = [str(p) for p in err.get("loc", ())]
        if len(loc) > 1 and loc[0] == "body" and loc[1] in UNION_TAGS:
            del loc[1]  # the tag of the one-or-many prompt union says nothing to a client
        out.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    return out


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _STATUS_CODES.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_response(
            400, "malformed_json", "the request body is not valid JSON", validation_details(errors)
        )
    return error_response(
        422, "validation_error", "the request is invalid", validation_details(errors)
    )


async def _redis_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable on %s %s: %s", request.method, request.url.path, redact(exc))
    return error_response(
        503,
        "redis_unavailable",
        f"the run's Redis is unreachable ({type(exc).__name__}); retry later",
        headers={"Retry-After": "5"},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "unhandled error on %s %s: %s: %s",
        request.method,
        request.url.path,
        type(exc).__name__,
        redact(exc),
    )
    return error_response(500, "internal_error", "internal error (see the api log)")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(redis.ConnectionError, _redis_error)
    app.add_exception_handler(redis.TimeoutError, _redis_error)
    app.add_exception_handler(Exception, _unexpected)


# Error responses every operation may return, for the OpenAPI schema.
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    reasons = {
        400: "Malformed request (e.g. body is not JSON)",
        401: "Missing or wrong bearer token",
        403: "Forbidden",
        404: "Not found",
        409: "Conflict",
        413: "Request body too large",
        415: "Unsupported content type",
        422: "Validation failed",
        503: "Redis unreachable",
    }
    return {s: {"model": ErrorBody, "description": reasons.get(s, "Error")} for s in statuses}
