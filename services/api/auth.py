"""Bearer-token authentication for every ``/v1`` route.

Enforced by an ASGI middleware, not a route dependency, so that it runs before anything reads
the body: an unauthenticated client gets a 401 whatever it sends (malformed JSON, a huge upload,
an unknown /v1 path), and the api never buffers a stranger's upload. The comparison is constant
time (``hmac.compare_digest`` on bytes). ``bearer_scheme`` is attached to the /v1 router only so
that the OpenAPI schema declares the security scheme; it does no checking of its own.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Security
from fastapi.security import HTTPBearer

from services.api.errors import error_response

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearerAuth",
    description="`Authorization: Bearer <CONSPO_API_TOKEN>` on every /v1 route.",
)
PROTECTED_PREFIX = "/v1"


def v1_router(**kwargs: Any) -> APIRouter:
    """A router for /v1 routes, declaring the bearer scheme in the OpenAPI schema. The prefix
    is on the router itself so that route templates (metrics labels) are the full paths."""
    return APIRouter(prefix=PROTECTED_PREFIX, dependencies=[Security(bearer_scheme)], **kwargs)


def _protected(path: str) -> bool:
    return path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")


def token_matches(header: bytes | None, expected: bytes) -> bool:
    if not header:
        return False
    scheme, _, credentials = header.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(credentials.strip(), expected)


class BearerAuthMiddleware:
    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self._token = token.encode() if token is not None else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self._token is None or scope["type"] != "http" or not _protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if token_matches(header, self._token):
            await self.app(scope, receive, send)
            return
        if header is None:
            challenge, message = 'Bearer realm="conspo"', "missing bearer token"
        else:
            challenge = 'Bearer realm="conspo", error="invalid_token"'
            message = "invalid bearer token"
        response = error_response(
            401, "unauthorized", message, headers={"WWW-Authenticate": challenge}
        )
        await response(scope, receive, send)
