"""
A provider POST straight to the socket, or straight through an httpx client's transport.

``httpx.AsyncClient.post`` builds and merges a request (cookies, headers, URL), then runs
auth, redirect and event-hook machinery around the transport; for the FCM and SMS
sends that was about half of each send's CPU under py-spy in
``bench/bench_channels_worker.py``. Going straight to the transport halved that; what
was left was the httpx request and response objects around aiohttp's own request path
(about 40% of the channels worker's CPU: the ``httpx_aiohttp`` wrapping a quarter of
it, aiohttp's request, connector and writer the rest). So for the providers' own
client (:class:`ProviderHttpClient`, which :func:`handlers.fanout.provider_http_client`
builds) with no proxy for the URL, :class:`DirectPost` writes the request bytes itself
on kept-alive HTTP/1.1 connections (TLS with the transport's own context) and parses
the answer whole (:func:`parse_response`): one fixed POST to one provider needs none of
a general client's machinery. A proxy, or any other client (plain httpx, a test's
transport), still goes through the client's transport as before.
"""

import asyncio
import re
import socket
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, cast

import aiohappyeyeballs
import httpx
from httpx_aiohttp import HttpxAiohttpClient
from httpx_aiohttp.transport import AiohttpTransport

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
"""A chunk-size line's number (RFC 9112: 1*HEXDIG; 16 digits is more than any body)."""

_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""A header name: an RFC 9110 token."""

_CHECKED_NAMES: dict[str, str] = {}
"""Header names found to be tokens, with their lower case: the providers' few, checked once."""

_FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
"""Headers the plain path writes itself; a call naming one would send it twice."""

_HAPPY_EYEBALLS_DELAY_S = 0.25
"""aiohttp's own: the next address family is tried if a connect has not finished by then."""


class DirectPost:
    """
    POSTs to one fixed ``url`` with ``client``'s transport, headers and timeout.

    The client still owns the connections (closing it closes them). Errors are the
    httpx exceptions ``client.post`` would raise (connect and read timeouts, connect
    errors, protocol errors).

    Args:
        client: the caller-owned client.
        url: where every POST goes.
    """

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self._client = client
        self._url = httpx.URL(url)
        self._parts: tuple[httpx.AsyncBaseTransport, dict[str, str], dict[str, Any]] | None = None
        self._plain: tuple[ProviderHttpClient, _Origin, bytes] | None = None
        self._start = b""
        """The request line and ``Host`` (the plain path)."""
        self._defaults: dict[str, str] = {}
        """The client's default headers by lower-case name, ``host`` left out (the plain path)."""

    def _setup(self) -> None:
        # Read on first use, as the client's configuration is by then final.
        # ``_transport_for_url`` is httpx's own (private) choice of transport, mounts
        # and proxies included; httpx is bounded below 1.0 and every FCM and SMS
        # test goes through this line, so a change there fails loudly.
        transport = self._client._transport_for_url(self._url)
        defaults = dict(self._client.headers)
        self._parts = (transport, defaults, self._client.timeout.as_dict())
        client = self._client
        if (
            isinstance(client, ProviderHttpClient)
            and transport is client._transport
            and isinstance(transport, AiohttpTransport)
            and self._url.scheme in ("http", "https")
        ):
            # The client's default headers, as httpx would send them; the encodings it
            # advertises are the ones ``httpx.Response`` decodes.
            fields = {k.lower(): v for k, v in defaults.items() if k.lower() != "host"}
            self._start = (
                b"POST " + self._url.raw_path + b" HTTP/1.1\r\nHost: " + self._url.netloc + b"\r\n"
            )
            self._defaults = fields
            lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
            prefix = self._start + lines.encode("latin-1")
            self._plain = (client, client._origin(self._url), prefix)

    async def __call__(self, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """One POST of ``content`` with ``headers`` over the client's defaults; read whole."""
        if self._parts is None:
            self._setup()
        if self._plain is not None:
            return await self._post_plain(content, headers)
        assert self._parts is not None  # noqa: S101 - set by _setup
        transport, defaults, timeout = self._parts
        request = httpx.Request(
            "POST",
            self._url,
            content=content,
            headers={**defaults, **headers},
            extensions={"timeout": timeout},
        )
        response = await transport.handle_async_request(request)
        response.request = request
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    async def _post_plain(self, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        assert self._plain is not None  # noqa: S101 - set by _setup
        assert self._parts is not None  # noqa: S101 - set by _setup
        client, origin, prefix = self._plain
        timeout = self._parts[2]
        if client.plain_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        names: set[str] = set()
        lines: list[str] = []
        for name, value in headers.items():
            lower = _CHECKED_NAMES.get(name)
            if lower is None:
                if _FIELD_NAME.fullmatch(name) is None:
                    raise httpx.LocalProtocolError(f"header name {name[:40]!r} is not a token")
                lower = name.lower()
                if len(_CHECKED_NAMES) < 256:
                    _CHECKED_NAMES[name] = lower
            if lower in names:
                # Two entries whose names differ only in case: which one the provider
                # reads is up to its parser, so neither goes out (httpx would send both).
                raise httpx.LocalProtocolError(f"header {name!r} given twice")
            if lower in _FRAMING:
                raise httpx.LocalProtocolError(f"header {name!r} is the client's to write")
            if "\r" in value or "\n" in value or "\0" in value:
                # A value with a line break would start a header line of its own (an access
                # token is a provider's answer); httpx and aiohttp refuse it the same way.
                raise httpx.LocalProtocolError("a header value holds a line break")
            names.add(lower)
            lines.append(f"{name}: {value}\r\n")
        if not names.isdisjoint(self._defaults):
            # A header the call names replaces the client's default of that name, as
            # httpx merges them: one field line each, never two.
            prefix = self._start + "".join(
                f"{name}: {value}\r\n"
                for name, value in self._defaults.items()
                if name not in names
            ).encode("latin-1")
        try:
            extra = "".join(lines).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise httpx.LocalProtocolError(f"a header value is not Latin-1: {exc}") from None
        request = b"".join((prefix, extra, b"Content-Length: %d\r\n\r\n" % len(content), content))
        async with client._slots:
            connection = client._take(origin)
            if connection is None:
                connection = await client._connect(origin, timeout["connect"])
            try:
                parsed = await connection.exchange(request, timeout["read"])
            except BaseException:
                connection.close()
                raise
            if parsed.keep_alive and not connection.closed and not client.plain_closed:
                connection.idle_since = time.monotonic()
                origin.idle.append(connection)
            else:
                connection.close()
        response = httpx.Response(
            parsed.status, headers=parsed.headers, stream=httpx.ByteStream(parsed.body)
        )
        if response.headers.get("content-encoding", "identity") == "identity":
            # The body as ``read`` would leave it, without its chunking and decoder
            # passes (about 25 us a response, timeit); ``_content`` is where httpx keeps
            # a read body, and every FCM and SMS test reads one through it.
            response._content = parsed.body
        else:
            response.read()  # httpx decodes gzip or deflate, as it would have
        return response


# --- the plain HTTP/1.1 path ------------------------------------------------------

_MAX_HEAD = 64 * 1024
"""Bytes a response's status line and headers may take (aiohttp's default is 8190 a line)."""

MAX_BODY = 1024 * 1024
"""
Bytes a response body may take: an FCM or Twilio answer is a few hundred bytes, so a
larger one is a fault, and it is refused before it is all held in memory.
"""


_MAX_FRAMING = 64 * 1024
_MAX_RESPONSE = _MAX_HEAD + MAX_BODY + _MAX_FRAMING
"""
Bytes a whole response may take while it is read: its head, a body at the cap and
room for chunk-size lines and trailers. Without it, the bytes that are not body
(a chunk-size line that never ends, endless trailer fields, a body sent one byte
per chunk) would be held, and parsed again at each read, until the read timeout.
"""


class _Parsed:
    """A whole response read off one connection."""

    __slots__ = ("body", "headers", "keep_alive", "status")

    def __init__(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, keep_alive: bool
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


def parse_response(
    buffer: bytes | bytearray, *, eof: bool, body_cap: int | None = None
) -> tuple[_Parsed, int] | None:
    """
    The first whole HTTP/1.1 response in ``buffer`` and the bytes it took, or ``None``
    while more must be read (pure). Interim ``1xx`` responses are passed over; the body
    is framed by ``Transfer-Encoding: chunked``, ``Content-Length`` or, failing both,
    the end of the connection (``eof``), as RFC 9112 section 6.3 orders them; an answer
    with a ``Transfer-Encoding`` is never kept alive, and a body over :data:`MAX_BODY`
    is an error as soon as its size is declared or received (the framing around it is
    bounded by :data:`_MAX_RESPONSE`).

    With ``body_cap``, a body longer than ``body_cap`` bytes is not an error: the
    answer is complete as soon as its first ``body_cap + 1`` bytes are in (enough to
    keep and to know it was cut), and it is never kept alive, as the rest of it is
    still on the connection. A webhook receiver's answer is the receiver's to size;
    only its start is recorded.

    Raises:
        httpx.RemoteProtocolError: the bytes are not an HTTP/1.x response, or more
            than :data:`_MAX_RESPONSE` of them are held without a whole one.
    """
    if len(buffer) > _MAX_RESPONSE:
        raise httpx.RemoteProtocolError(f"response over {_MAX_RESPONSE} bytes")
    start = 0
    while True:
        end = buffer.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buffer) - start > _MAX_HEAD:
                raise httpx.RemoteProtocolError("response head too long")
            if eof:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            return None
        lines = bytes(buffer[start:end]).split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(code)
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise httpx.RemoteProtocolError(f"malformed header line: {line[:80]!r}")
            headers.append((name, value.strip()))
        body_at = end + 4
        if 100 <= status < 200:
            start = body_at  # an interim answer; the final one follows
            continue
        break
    fields: dict[bytes, bytes] = {}
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length" and fields.get(lower, value) != value:
            raise httpx.RemoteProtocolError("two different Content-Length values")
        fields[lower] = value
    connection = fields.get(b"connection", b"").lower()
    keep_alive = b"close" not in connection and (
        version == b"HTTP/1.1" or b"keep-alive" in connection
    )
    if status in (204, 304):
        return _Parsed(status, headers, b"", keep_alive), body_at
    coding = fields.get(b"transfer-encoding")
    if coding is not None:
        # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and an
        # answer with both may be an attempt at smuggling, so the connection is closed
        # after it. A coding other than a final "chunked" runs to the close.
        keep_alive = False
        if coding.lower().rpartition(b",")[2].strip() != b"chunked":
            return _read_to_close(status, headers, buffer, body_at, eof=eof, body_cap=body_cap)
        chunks: list[bytes] = []
        held = 0
        at = body_at
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                _incomplete(eof=eof)
                return None
            size_text = bytes(buffer[at:line_end]).split(b";", 1)[0].strip()
            # Hex digits only: int() would also take "-6", "+a", "0x10" or "1_0", and a
            # negative size would send this loop back to where it started, for ever.
            if _CHUNK_SIZE.fullmatch(size_text) is None:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_text[:20]!r}")
            size = int(size_text, 16)
            held += size
            if held > MAX_BODY and body_cap is None:
                raise httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes")
            if size == 0:
                # Trailer fields (none expected), then an empty line.
                at = line_end + 2
                while True:
                    field_end = buffer.find(b"\r\n", at)
                    if field_end < 0:
                        _incomplete(eof=eof)
                        return None
                    if field_end == at:
                        return _Parsed(status, headers, b"".join(chunks), keep_alive), at + 2
                    at = field_end + 2
            data_at = line_end + 2
            if body_cap is not None:
                kept = sum(map(len, chunks))
                if kept + min(size, len(buffer) - data_at) > body_cap:
                    chunks.append(bytes(buffer[data_at : data_at + body_cap + 1 - kept]))
                    return _Parsed(status, headers, b"".join(chunks), False), len(buffer)
            if len(buffer) < data_at + size + 2:
                _incomplete(eof=eof)
                return None
            if buffer[data_at + size : data_at + size + 2] != b"\r\n":
                raise httpx.RemoteProtocolError("chunk not followed by CRLF")
            chunks.append(bytes(buffer[data_at : data_at + size]))
            at = data_at + size + 2
    length = fields.get(b"content-length")
    if length is not None:
        if not length.isdigit():
            raise httpx.RemoteProtocolError(f"bad Content-Length {length[:20]!r}")
        if body_cap is not None and (len(length) > 10 or int(length) > body_cap):
            if len(buffer) < body_at + body_cap + 1:
                _incomplete(eof=eof)
                return None
            return _Parsed(
                status, headers, bytes(buffer[body_at : body_at + body_cap + 1]), False
            ), (len(buffer))
        if len(length) > 10 or int(length) > MAX_BODY:
            raise httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes")
        stop = body_at + int(length)
        if len(buffer) < stop:
            _incomplete(eof=eof)
            return None
        return _Parsed(status, headers, bytes(buffer[body_at:stop]), keep_alive), stop
    return _read_to_close(status, headers, buffer, body_at, eof=eof, body_cap=body_cap)


def _read_to_close(
    status: int,
    headers: list[tuple[bytes, bytes]],
    buffer: bytes | bytearray,
    body_at: int,
    *,
    eof: bool,
    body_cap: int | None = None,
) -> tuple[_Parsed, int] | None:
    """
    A body that runs to the end of the connection (never kept alive), within
    ``MAX_BODY``, or its first ``body_cap + 1`` bytes once that many are in.
    """
    if body_cap is not None and len(buffer) - body_at > body_cap:
        return _Parsed(status, headers, bytes(buffer[body_at : body_at + body_cap + 1]), False), (
            len(buffer)
        )
    if len(buffer) - body_at > MAX_BODY:
        raise httpx.RemoteProtocolError(f"response body over {MAX_BODY} bytes")
    if not eof:
        return None
    return _Parsed(status, headers, bytes(buffer[body_at:]), False), len(buffer)


def _incomplete(*, eof: bool) -> None:
    """``None`` (read more), or, at the end of the connection, the error."""
    if eof:
        raise httpx.RemoteProtocolError("Server disconnected before the response was complete.")


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: one request at a time, the answer parsed whole."""

    def __init__(self, registry: set["_Connection"], *, body_cap: int | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._body_cap = body_cap
        """Bytes of an answer's body read at most (:func:`parse_response`'s ``body_cap``)."""
        self._buffer = bytearray()
        self._waiter: asyncio.Future[_Parsed] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._registry = registry
        """The client's open connections, idle or in use, which its ``aclose`` closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream socket's transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._settle(eof=False)

    def eof_received(self) -> bool:
        self._settle(eof=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._registry.discard(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._settle(eof=True)
            if not waiter.done():
                waiter.set_exception(httpx.RemoteProtocolError(f"Server disconnected: {exc!r}"))

    def _settle(self, *, eof: bool) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            if self._buffer and waiter is None:
                # Bytes nobody asked for: the connection is out of step; never reuse it.
                self.closed = True
            return
        try:
            parsed = parse_response(self._buffer, eof=eof, body_cap=self._body_cap)
        except httpx.RemoteProtocolError as exc:
            waiter.set_exception(exc)
            return
        if parsed is not None:
            response, used = parsed
            del self._buffer[:used]
            if self._buffer:
                response.keep_alive = False  # more than one answer to one request
            waiter.set_result(response)

    async def exchange(self, request: bytes, timeout_s: float | None) -> _Parsed:
        """
        Write ``request`` and wait for its whole response, at most ``timeout_s``.

        One timer per exchange rather than ``asyncio.timeout``, whose context and
        cancellation bookkeeping cost about a tenth of the worker's CPU under py-spy.

        Raises:
            httpx.ReadTimeout: no whole answer within ``timeout_s``.
            httpx.RemoteProtocolError: a malformed answer, or the server hung up.
        """
        assert self.transport is not None  # noqa: S101 - connected before use
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Parsed] = loop.create_future()
        self._waiter = waiter
        timer = None if timeout_s is None else loop.call_later(timeout_s, self._expire, timeout_s)
        self.transport.write(request)
        try:
            return await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _expire(self, timeout_s: float) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(httpx.ReadTimeout(f"no whole answer within {timeout_s}s"))

    def close(self) -> None:
        self.closed = True
        self._registry.discard(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # Closed while an exchange waits (the client's ``aclose``): it fails now
            # rather than at its read timeout.
            waiter.set_exception(httpx.ReadError("the connection was closed by the client"))
        if self.transport is not None:
            self.transport.close()


class _Origin:
    """The idle connections to one ``(scheme, host, port)``."""

    def __init__(self, scheme: str, host: str, port: int) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.idle: list[_Connection] = []


class ProviderHttpClient(HttpxAiohttpClient):
    """
    The providers' httpx client (aiohttp-backed), plus the connections
    :class:`DirectPost` keeps for its plain HTTP/1.1 path; :meth:`aclose` closes both.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._open: set[_Connection] = set()
        """Every open plain connection, idle or carrying an exchange."""
        self.plain_closed = False
        """Set by :meth:`aclose`: the plain path sends nothing more."""
        limits: httpx.Limits = kwargs.get("limits", httpx.Limits())
        self._slots = asyncio.Semaphore(limits.max_connections or 100)
        self._keepalive_s = limits.keepalive_expiry if limits.keepalive_expiry is not None else 5.0

    def _origin(self, url: httpx.URL) -> _Origin:
        port = url.port or (443 if url.scheme == "https" else 80)
        key = (url.scheme, url.host, port)
        found = self._origins.get(key)
        if found is None:
            found = self._origins[key] = _Origin(url.scheme, url.host, port)
        return found

    def _take(self, origin: _Origin) -> _Connection | None:
        """The most recently used idle connection still open and fresh, else ``None``."""
        now = time.monotonic()
        while origin.idle:
            connection = origin.idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: _Origin, timeout_s: float | None) -> _Connection:
        transport = self._transport
        assert isinstance(transport, AiohttpTransport)  # noqa: S101 - checked by DirectPost
        loop = asyncio.get_running_loop()
        tls = transport.ssl_context if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout_s):
                # Happy eyeballs as aiohttp connects (the library it uses): a host whose
                # IPv6 address resolves but is dropped still gets an IPv4 connection.
                # uvloop's create_connection has no happy_eyeballs_delay of its own.
                infos = await loop.getaddrinfo(origin.host, origin.port, type=socket.SOCK_STREAM)
                sock = await aiohappyeyeballs.start_connection(
                    infos, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY_S, interleave=1
                )
                try:
                    _, connection = await loop.create_connection(
                        lambda: _Connection(self._open),
                        sock=sock,
                        ssl=tls,
                        server_hostname=origin.host if tls is not None else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {origin.host}:{origin.port}") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"connecting to {origin.host}:{origin.port}: {exc}") from exc
        if self.plain_closed:
            # The client was closed while this connection was being opened.
            connection.close()
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        return connection

    def _close_plain(self) -> None:
        # Idle connections and the ones carrying an exchange (which then fails with
        # ``httpx.ReadError``), so none outlives the client.
        self.plain_closed = True
        for origin in self._origins.values():
            origin.idle = []
        for connection in list(self._open):
            connection.close()

    async def aclose(self) -> None:
        """Close the plain path's connections, then the httpx client's."""
        self._close_plain()
        await super().aclose()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        # httpx's ``async with`` closes its transports without calling ``aclose``.
        self._close_plain()
        await super().__aexit__(exc_type, exc_value, traceback)
