"""
How the API is served: uvicorn, with bounds on reading headers and on connections.

uvicorn bounds the idle time between two requests of a kept-alive connection
(``timeout_keep_alive``, 5 s) but not the time a connection takes to send a request's
headers: a connection that sends nothing, or a header line every few seconds, stays
open for ever (its keep-alive timer is only armed after a first response, and any
byte cancels it). With httptools it does not bound the headers' size either (h11's
``h11_max_incomplete_event_size`` does, but h11 is the slower parser): one request
can pile up hundreds of MB of header lines. Its ``limit_concurrency`` answers a
plain-text 503 once too many connections or tasks exist, but only after reading each
newcomer's headers, which is exactly what a slow client never finishes.
:class:`BoundedHttpToolsProtocol` adds the three bounds to uvicorn's httptools
protocol (the one ``uvicorn[standard]`` picks by default) with one timer per
connection, a byte count and the connection set uvicorn already keeps; the body's
own bounds are the app's (:mod:`delivery.api.limits`).

A connection answered before its request was read in full (a body over the cap or
too slow, headers too large) is closed with a short lingering close, so that the
client can read the answer. None of the bounds touches a response in progress: the
header timer stops at the end of the headers and only restarts at the first byte of a
next request, so a live stream (a GET answered for hours) is never cut; it holds one
connection, as it should.
"""

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from delivery.errors import DeliveryError, HeadersTooLargeError, TooManyConnectionsError
from delivery.settings import Settings

_log = structlog.get_logger(__name__)

MAX_HEADER_BYTES = 64 * 1024
"""Request line plus headers, per request (nginx reads 32 KiB, Node 16 KiB by default)."""
LINGER_S = 2.0
"""How long a connection answered before its request was read in full is drained."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """
    Per-connection bounds of :class:`BoundedHttpToolsProtocol`.

    Attributes:
        header_timeout_s: time to send a request's headers, counted from the accept
            (first request) or from the request's first byte (later ones).
        max_connections: open connections per process; one more is answered 503
            ``TOO_MANY_CONNECTIONS`` and closed without reading its request.
        max_header_bytes: request line plus headers; past it 431 ``HEADERS_TOO_LARGE``.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 16_384
    max_header_bytes: int = MAX_HEADER_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        """The limits ``DELIVERY_HEADER_TIMEOUT_S`` / ``DELIVERY_MAX_CONNECTIONS`` set."""
        return cls(
            header_timeout_s=settings.header_timeout_s, max_connections=settings.max_connections
        )


class BoundedConfig(uvicorn.Config):
    """A ``uvicorn.Config`` serving with :class:`BoundedHttpToolsProtocol` under ``limits``."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, http=BoundedHttpToolsProtocol, **kwargs)
        self.limits = limits


def _raw_response(error: DeliveryError, reason: str) -> bytes:
    """``error`` in the API's error shape, as bytes written before any ASGI app runs."""
    body = json.dumps(error.to_body()).encode()
    head = (
        f"HTTP/1.1 {error.status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


_BUSY = _raw_response(
    TooManyConnectionsError("", "this server holds as many connections as it accepts; retry later"),
    "Service Unavailable",
)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size and a connection cap."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits if isinstance(config, BoundedConfig) else ConnectionLimits()
        self._header_timer: asyncio.TimerHandle | None = None
        """Armed exactly while a request's headers are awaited."""
        self._header_bytes = 0
        self._headers_ended = False
        """A request's headers ended during the current ``data_received``."""
        self._body_pending = False
        """Between a request's headers and the end of its body."""
        self._linger_timer: asyncio.TimerHandle | None = None
        """Armed while the connection drains before its close; nothing is parsed then."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn has just counted this connection in.
        if len(self.connections) > self.limits.max_connections:
            _log.warning("http.too_many_connections", max_connections=self.limits.max_connections)
            transport.write(_BUSY)
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger_timer is not None:
            return  # draining before the close: read and dropped, never parsed
        reading_headers = self._header_timer is not None
        self._headers_ended = False
        super().data_received(data)
        if self._header_timer is None or not reading_headers or self._headers_ended:
            # Headers done in this chunk, or a next request began in it: its header bytes
            # are counted from the next chunk (at most one read's worth goes uncounted).
            self._header_bytes = 0
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.limits.max_header_bytes:
            _log.info("http.headers_too_large", max_header_bytes=self.limits.max_header_bytes)
            self._cancel_header_timer()
            error = HeadersTooLargeError(
                "", f"the request line and headers exceed {self.limits.max_header_bytes} bytes"
            )
            self._close_after(_raw_response(error, "Request Header Fields Too Large"), linger=True)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A later request on a kept-alive connection: its headers are timed from now
        # (the first one's were from the accept, which also bounds an idle newcomer).
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        self._headers_ended = True
        self._body_pending = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._body_pending = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._body_pending and not self.transport.is_closing():
            # Answered before its body was in (413 / 408 from delivery.api.limits): the
            # rest of the body is never read, so the connection cannot carry another
            # request and a client still sending must be stopped.
            self._close_after(None, linger=True)

    def _arm_header_timer(self) -> None:
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(
            self.limits.header_timeout_s, self._on_header_timeout
        )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        _log.info(
            "http.header_timeout",
            client=self.client[0] if self.client else None,
            timeout_s=self.limits.header_timeout_s,
        )
        self._close_after(None, linger=False)

    def _close_after(self, answer: bytes | None, *, linger: bool) -> None:
        """
        Write ``answer`` and close, or close once the response in progress has gone out
        (a pipelined request stalled behind it).

        With ``linger``, the close is a lingering one: the write side is shut (the
        client reads the answer, then end-of-file) and what the client still sends is
        read and dropped for up to :data:`LINGER_S`. Closing a socket with unread
        bytes makes the kernel send a reset, which can destroy the answer before the
        client reads it: a client uploading a too-large body would see "connection
        reset" instead of its 413.
        """
        if self.transport.is_closing():
            return
        cycle: RequestResponseCycle | None = self.cycle  # None before a first request
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            self.flow.pause_reading()  # no more of the stalled request meanwhile
            return
        if answer is not None:
            self.transport.write(answer)
        if not linger or not self.transport.can_write_eof():
            self.transport.close()
            return
        self._unset_keepalive_if_required()
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)


def server_config(app: Any, settings: Settings, **overrides: Any) -> BoundedConfig:
    """
    The uvicorn configuration every API process serves with (``run``, ``web``, tests).

    ``host`` / ``port`` come from ``settings`` unless overridden; logging is left to
    structlog (our middleware logs each request); ``overrides`` are passed to uvicorn.
    """
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "ws": "none",
    }
    options.update(overrides)
    return BoundedConfig(app, limits=ConnectionLimits.from_settings(settings), **options)
