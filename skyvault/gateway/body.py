"""Request bodies with bounded memory.

A declared size (Content-Length) over the limit is refused before anything is read, and a streamed
body is counted as it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from skyvault.errors import RequestTooLargeError


def _too_large(limit: int, size: int | None = None) -> RequestTooLargeError:
    told = "larger than" if size is None else f"{size} bytes, more than"
    return RequestTooLargeError(
        f"request body is {told} the limit gateway.max_body_bytes = {limit}", field="body"
    )


def declared_size(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it does not give one (or gives nonsense)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return max(int(value), 0)
            except ValueError:
                return None
    return None


def _refusal(message: str) -> dict[str, Any]:
    return {"detail": message, "field": "body"}


class BodyLimitMiddleware:
    """Bounds every request body.

    A request whose Content-Length is over ``limit`` is refused (413) before the app sees it, and
    reading a streamed body past ``limit`` raises :class:`RequestTooLargeError`.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = declared_size(scope)
        if size is not None and size > self.limit:
            body = json.dumps(_refusal(str(_too_large(self.limit, size)))).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0
        limit = self.limit

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        await self.app(scope, counted, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing it as soon as it passes ``limit`` bytes.

    Raises:
        RequestTooLargeError: the body is larger than ``limit``.

    """
    size = declared_size(request.scope)
    if size is not None and size > limit:
        raise _too_large(limit, size)
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)
