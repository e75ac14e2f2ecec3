"""Request body size limit, enforced before any handler runs.

A declared ``Content-Length`` above the limit is refused at once. Otherwise (chunked uploads, or
a client that lies) the body is read here, counting bytes, and refused as soon as the count
passes the limit; a body within the limit is then replayed to the app. Buffering costs nothing
extra: every endpoint needs the whole body anyway (JSON, or a JSONL file stored in Redis).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.api.errors import error_response


class BodyLimitMiddleware:
    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> Any:
        return error_response(
            413,
            "payload_too_large",
            f"request body exceeds the limit of {self.max_bytes} bytes (max_body_bytes)",
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                response = error_response(400, "bad_request", "invalid Content-Length header")
                await response(scope, receive, send)
                return
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
