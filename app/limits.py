"""Request-body size limit, enforced while the body streams in (FastAPI has none of its own).

A declared Content-Length over the limit is refused before any byte is read; a body without one
(chunked) or whose length lies is cut off the moment it passes the limit. Either way the client
gets a JSON 413 and the server never holds more than the limit in memory.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, error_body


class BodyTooLarge(ApiError):
    """Raised from ``receive`` mid-stream; the app's ApiError handler answers 413."""

    def __init__(self, limit: int):
        # The app's handler answers this one, mid-stream: without "Connection: close" the server
        # would keep the connection and read (and discard) the rest of a body of any size.
        super().__init__(413, "payload_too_large", _message(limit), {"Connection": "close"})


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(send)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(error_body("payload_too_large", _message(self.max_body_bytes))).encode()
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


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _message(limit: int) -> str:
    return (
        f"the request body is larger than the limit of {limit} bytes "
        "(PHOTOTAG_MAX_BODY_BYTES); send fewer or smaller photos"
    )
