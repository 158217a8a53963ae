"""
The request body, bounded in size and in time before anything else reads it.

:class:`BodyLimitMiddleware` sits just inside the request-context middleware (so its
answers carry a request id and are logged and counted) and outside authentication,
``Idempotency-Key`` and the routes. A request that declares a body has it read here,
whole, within ``timeout_s`` and up to ``max_bytes``, and passed on as one message;
so no layer below ever holds, hashes or parses more than ``max_bytes``, and a client
that sends slowly is answered and disconnected after ``timeout_s`` whatever key it
holds. Reading first costs at most ``max_bytes`` per request, which the layers below
would buffer anyway (the idempotency hash and the JSON parser each need the whole body).

uvicorn has no body limit (it pauses reading past 64 KiB until the app asks for more,
so the cap belongs in the app). Starlette's ``RequestBodyLimitMiddleware`` (what
FastAPI's ``max_body_size`` installs) counts the bytes as the layers below read them
and raises out of their ``receive()`` call, so the failure crosses the request-context,
authentication and idempotency middlewares (logged as an unhandled error, and left to
each to clean up after), answers ``{"detail": ...}`` rather than the API's error
shape, and has no time bound; hence this small class, where nothing below ever sees
a failure.

Requests without a body (no ``Content-Length`` or a zero one, no
``Transfer-Encoding``) pass through untouched: the live stream's GET keeps reading
``http.disconnect`` for as long as it lives, with no deadline.
"""

import asyncio
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from delivery.errors import DeliveryError, RequestTimeoutError, RequestTooLargeError

_STREAMED = -1
"""Framing of a chunked body: its size is only known once it has arrived."""


class _TooLarge(Exception):
    """The streamed body went past the cap."""


def _declared_body(headers: list[tuple[bytes, bytes]]) -> int | None:
    """``Content-Length``, ``_STREAMED`` for a chunked body, ``None`` when there is no body."""
    length: int | None = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return _STREAMED
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:  # uvicorn's parser refuses these first; count the bytes then
                return _STREAMED
    return length or None


async def _reject(send: Send, error: DeliveryError) -> None:
    """
    Answer ``error`` in the API's error shape, the rest of the body unread.

    No ``Connection: close``: uvicorn would close the socket at once, with the unread
    body in it, and the kernel's reset can destroy the answer before the client reads
    it. The server protocol (:mod:`delivery.api.serving`) closes a connection answered
    before its body was in with a lingering close instead.
    """
    body = json.dumps(error.to_body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def replaying(body: bytes, receive: Receive) -> Receive:
    """
    ``receive`` that first gives ``body`` whole, as one message, then defers to
    ``receive``: how a layer that has read the body passes the request on.
    """
    given = False

    async def replay() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimitMiddleware:
    """
    Pure ASGI middleware: read a request's body whole, within a size and a time bound.

    Args:
        max_bytes: the largest body accepted; a larger ``Content-Length`` is answered
            413 ``REQUEST_TOO_LARGE`` without reading any of it, and a chunked body
            as soon as it goes past the cap.
        timeout_s: the time the whole body has to arrive, from the end of the
            headers; past it the answer is 408 ``REQUEST_TIMEOUT``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_body(scope["headers"])
        if declared is None:
            await self.app(scope, receive, send)
            return
        if declared > self.max_bytes:
            await _reject(send, self._too_large(f"is {declared} bytes"))
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            await _reject(
                send,
                RequestTimeoutError(
                    "body", f"the request body did not arrive within {self.timeout_s:g} s"
                ),
            )
            return
        except _TooLarge:
            await _reject(send, self._too_large(f"is larger than {self.max_bytes} bytes"))
            return
        if body is None:
            return  # the client left; there is no one to answer
        await self.app(scope, replaying(body, receive), send)

    def _too_large(self, size: str) -> RequestTooLargeError:
        return RequestTooLargeError(
            "body", f"the request body {size}; at most {self.max_bytes} bytes are accepted"
        )

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` if the client disconnected first."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
