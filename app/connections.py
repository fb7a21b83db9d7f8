"""Bounds on the served process's connections, below the ASGI app (``python -m app``).

uvicorn's HTTP protocol (httptools) keeps a connection that never finishes its request head open
for as long as the client likes (its keep-alive timeout only runs after a response), reads a head
of any size, and its ``limit_concurrency`` answers plain text, not the API's JSON errors. This
protocol is uvicorn's httptools one with three bounds added:

- header timeout (PHOTOTAG_HEADER_TIMEOUT_S): a request's line and headers must arrive within it,
  counted from the connection's opening, or from the first byte of a later request on a kept-alive
  connection. Then the connection is closed: silently if nothing had come (as an idle keep-alive
  connection is), else after a 408 ``request_timeout``;
- header size (PHOTOTAG_MAX_HEADER_BYTES): a request whose line and headers are larger is answered
  431 ``headers_too_large`` and the connection closed; a head still incomplete past the limit is
  refused as soon as it crosses it, so the server never buffers more than about the limit (plus
  one read) per connection;
- connection cap (PHOTOTAG_MAX_CONNECTIONS): a connection opened while that many are open gets a
  503 ``overloaded`` with ``Retry-After: 1`` to its first request and is closed; the connections
  already open are served as before. Idle ones beyond the cap last at most the header timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import error_body
from app.settings import Settings

log = logging.getLogger("phototag.connections")

# File descriptors the process needs besides its connections: checkpoints, logs, threads' pipes.
FD_RESERVE = 256
# After a 408 or 431 of its own, how long the protocol still reads (and drops) what the client
# sends before it closes: closing with unread input resets the connection, and the client would
# see the reset instead of the answer.
LINGER_S = 2.0


@dataclass(frozen=True)
class Bounds:
    max_header_bytes: int
    header_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Bounds:
        return cls(settings.max_header_bytes, settings.header_timeout_s, settings.max_connections)


def bounded_protocol(bounds: Bounds) -> type[BoundedHttpProtocol]:
    """The protocol class to give uvicorn (``http=``), with ``bounds``."""
    too_large = _Refusal(
        431,
        "headers_too_large",
        f"the request line and headers are larger than {bounds.max_header_bytes} bytes "
        "(PHOTOTAG_MAX_HEADER_BYTES)",
    )
    over_capacity = _Refusal(
        503,
        "overloaded",
        f"the server holds its limit of {bounds.max_connections} connections "
        "(PHOTOTAG_MAX_CONNECTIONS); retry shortly",
        {"Retry-After": "1"},
    )
    attributes = {"bounds": bounds, "too_large": too_large, "over_capacity": over_capacity}
    return type("BoundedHttpProtocol", (BoundedHttpProtocol,), attributes)


class _Refusal:
    """A JSON error answer, as a tiny ASGI app (for a request whose head was read) and as raw
    bytes (for one whose head never completed)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        self.status = status
        self.body = json.dumps(error_body(code, message)).encode()
        self.headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            (b"connection", b"close"),  # uvicorn closes the connection after the answer
            *((name.lower().encode(), value.encode()) for name, value in (headers or {}).items()),
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})

    def raw(self, default_headers: list[tuple[bytes, bytes]]) -> bytes:
        status = f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}".encode()
        lines = [status, *(name + b": " + value for name, value in default_headers + self.headers)]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


_TIMED_OUT = _Refusal(
    408,
    "request_timeout",
    "the request line and headers did not arrive within the server's header timeout "
    "(PHOTOTAG_HEADER_TIMEOUT_S)",
)


class BoundedHttpProtocol(HttpToolsProtocol):
    """One connection; see the module docstring. Built by :func:`bounded_protocol`."""

    bounds: ClassVar[Bounds]
    too_large: ClassVar[_Refusal]
    over_capacity: ClassVar[_Refusal]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's own cap (plain text) stays off: ours is JSON
        self._in_head = True  # from a request's start until its headers are complete
        self._head_received = 0  # bytes received while in a head
        self._head_size = 0  # request line + headers parsed so far
        self._head_timer: asyncio.TimerHandle | None = None
        self._beyond_cap = False
        self._lingering: asyncio.TimerHandle | None = None  # answered; closing soon

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # counts this connection in self.connections
        self._beyond_cap = len(self.connections) > self.bounds.max_connections
        if self._beyond_cap:
            log.warning(
                "connection limit reached (PHOTOTAG_MAX_CONNECTIONS=%d): answering 503",
                self.bounds.max_connections,
            )
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            return  # answered already: dropped until the client or LINGER_S closes
        if self._in_head:
            self._head_received += len(data)
            self._start_head_timer()  # no-op when it runs already
        super().data_received(data)
        head = max(self._head_received, self._head_size)
        too_large = self._in_head and head > self.bounds.max_header_bytes
        if too_large and not self.transport.is_closing() and self._lingering is None:
            log.warning("refused a request head over %d bytes", self.bounds.max_header_bytes)
            self._answer_and_close(self.too_large)

    # --- httptools parser callbacks

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._in_head = False
        refusal = None
        if self._head_size > self.bounds.max_header_bytes:
            log.warning("refused a request head over %d bytes", self.bounds.max_header_bytes)
            refusal = self.too_large
        elif self._beyond_cap:
            refusal = self.over_capacity
        if refusal is None:
            super().on_headers_complete()
            return
        app, self.app = self.app, refusal  # this one request is answered by the refusal
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_received, self._head_size = True, 0, 0

    # --- the header timeout

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            timeout = self.bounds.header_timeout_s
            self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self._lingering is not None:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is under way and the next (pipelined) head is late: close after it.
            self.cycle.keep_alive = False
        elif self._head_received:
            self._answer_and_close(_TIMED_OUT)
        else:
            self.transport.close()  # nothing came: closed like an idle keep-alive connection

    def _answer_and_close(self, refusal: _Refusal) -> None:
        """Answer, then close: at once when the client has closed its side (it has read the
        answer or will not), at the latest after LINGER_S."""
        self._stop_head_timer()
        self.transport.write(refusal.raw(self.server_state.default_headers))
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = self.loop.call_later(LINGER_S, self.transport.close)


def ensure_open_files(max_connections: int) -> None:
    """Raise the process's soft limit of open files, within the hard limit, so that
    ``max_connections`` connections fit beside the files the server itself needs; warn if they
    cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FD_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning(
            "the open-files limit (%d) is below PHOTOTAG_MAX_CONNECTIONS=%d plus %d for the "
            "server's own files; connections may fail before the cap (raise `ulimit -n`)",
            target,
            max_connections,
            FD_RESERVE,
        )
