"""
Webhook POSTs straight to the socket, connecting only to addresses the SSRF guard vetted.

aiohttp's request path (its request and response objects, connector, writer and
stream reader) was about a quarter of the webhook worker's event loop under py-spy in
``bench/bench_webhooks_e2e.py``; a webhook POST is one fixed request shape whose answer
is a status, one header and at most ``body_limit`` bytes of body, so
:class:`GuardedConnections` writes the request bytes itself on kept-alive HTTP/1.1
connections and parses the answer with :func:`handlers.provider_http.parse_response`,
as the providers' :class:`~handlers.provider_http.DirectPost` does.

What the aiohttp session gave a webhook, and how it is kept here:

- the SSRF guard at connect time: a name is resolved by
  :class:`~handlers.ssrf.GuardedResolver`, which fails the lookup if *any* address it
  resolves to is refused, and the socket is connected only to the addresses it returned
  (happy eyeballs over them, as aiohttp does), so a name re-pointed after registration
  cannot reach an internal address; an IP-literal host is checked by
  :func:`~handlers.ssrf.check_literal_host` before it is connected to;
- no redirects (a 3xx is an answer like any other), no proxy (the environment is never
  read), no cookie jar (nothing of an answer is kept but its status, ``Retry-After``
  and the start of its body);
- TLS for ``https`` with the channel's context: certificate and hostname verification
  by default (``server_hostname`` is the URL's host, which is also the SNI name);
- a bounded answer: a head of at most 64 KiB, the body's first ``body_limit + 1``
  bytes (the connection is then closed rather than read to the end), chunked and
  ``Content-Length`` framing, 1xx answers passed over;
- one deadline around connect, write and read (the caller's ``timeout_s``): the
  exchange's own timer on a kept-alive connection, ``asyncio.timeout`` around a new
  connection and its exchange.
"""

import asyncio
import socket
import ssl
import time

import aiohappyeyeballs

from handlers.provider_http import _Connection, _Parsed
from handlers.ssrf import GuardedResolver, IPNetwork, check_literal_host

KEEPALIVE_S = 4.0
"""
How long an idle connection is reused. Below the 5 s that Node's HTTP server (a common
receiver) keeps one open, so a connection is not reused in the instant its server
closes it: a POST is never retried on another connection, so that race would cost an
attempt.
"""

_HAPPY_EYEBALLS_DELAY_S = 0.25
"""aiohttp's own: the next address is tried if a connect has not finished by then."""


def tls_context(tls: ssl.SSLContext | bool) -> ssl.SSLContext:
    """
    The context for ``https`` receivers: ``tls`` itself, the default verifying context
    for ``True``, and for ``False`` one that verifies nothing (aiohttp's ``ssl=False``).
    """
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls:
        return ssl.create_default_context()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class GuardedConnections:
    """
    Kept-alive HTTP/1.1 connections to webhook receivers, one request at a time each.

    The caller bounds how many are in use per origin and overall (the channel's
    semaphores); this keeps the idle ones by origin and closes them all on
    :meth:`aclose`.

    Args:
        guard: resolves names to vetted addresses only.
        allow_nets: the guard's allowlist, for IP-literal hosts.
        tls: the ``https`` context (see :func:`tls_context`).
        body_cap: bytes of an answer's body read at most beyond which it is cut.
    """

    def __init__(
        self,
        guard: GuardedResolver,
        allow_nets: tuple[IPNetwork, ...],
        tls: ssl.SSLContext | bool,
        body_cap: int,
    ) -> None:
        self._guard = guard
        self._allow_nets = allow_nets
        self._tls = tls
        self._context: ssl.SSLContext | None = None
        self._body_cap = body_cap
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        """Every open connection, idle or carrying an exchange, which :meth:`aclose` closes."""
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False

    async def post(
        self, scheme: str, host: str, port: int, request: bytes, timeout_s: float
    ) -> tuple[int, bytes, str | None]:
        """
        Send ``request`` (the whole POST's bytes) to ``scheme://host:port``; return the
        answer's status, the start of its body and its ``Retry-After``, all within
        ``timeout_s`` (connect, write and read together).

        On a kept-alive connection the exchange is the whole attempt, so its own timer
        (:meth:`~handlers.provider_http._Connection.exchange`) is the deadline; only a
        new connection runs under ``asyncio.timeout``, whose context and cancellation
        bookkeeping were about 3% of the webhook worker's CPU under py-spy in
        ``bench/bench_webhooks_e2e.py`` when every attempt took one.

        Raises:
            BlockedAddressError: the guard refuses the host or an address it resolves to.
            OSError: resolution or connection failed.
            httpx.RemoteProtocolError: the answer is not HTTP/1.x, or the server hung up.
            httpx.ReadTimeout: no whole answer on a kept-alive connection in time.
            TimeoutError: a new connection and its answer took longer than ``timeout_s``.
            RuntimeError: called after :meth:`aclose`.
        """
        if self.closed:
            raise RuntimeError("the webhook connections are closed")
        key = (scheme, host, port)
        connection = self._take(key)
        if connection is not None:
            parsed = await self._exchange(connection, request, timeout_s)
        else:
            async with asyncio.timeout(timeout_s):
                connection = await self._connect(scheme, host, port)
                parsed = await self._exchange(connection, request, None)
        if parsed.keep_alive and not connection.closed and not self.closed:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(connection)
            if self._sweep is None:
                self._sweep = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._close_stale)
        else:
            connection.close()
        retry_after: str | None = None
        for name, value in parsed.headers:
            if len(name) == 11 and name.lower() == b"retry-after":
                retry_after = value.decode("latin-1")
                break
        return parsed.status, parsed.body, retry_after

    @staticmethod
    async def _exchange(
        connection: _Connection, request: bytes, timeout_s: float | None
    ) -> _Parsed:
        try:
            return await connection.exchange(request, timeout_s)
        except BaseException:
            # Whatever was read of an answer cut short, the connection cannot carry another.
            connection.close()
            raise

    def _take(self, key: tuple[str, str, int]) -> _Connection | None:
        """The most recently used idle connection still open and fresh, else ``None``."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.close()
        del self._idle[key]
        return None

    def _close_stale(self) -> None:
        """
        Close the idle connections past :data:`KEEPALIVE_S` and forget their origins;
        again later while any stay idle.

        Reuse alone would check their age only when their origin is posted to again:
        a receiver that never closes idle connections (many do not), or a tenant's
        endpoints on many origins, would then hold sockets in this worker for good,
        one origin's idle sockets taking file descriptors every other tenant needs.
        """
        self._sweep = None
        now = time.monotonic()
        for key, idle in list(self._idle.items()):
            fresh = []
            for connection in idle:
                if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                    fresh.append(connection)
                else:
                    connection.close()
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]
        if self._idle and not self.closed:
            self._sweep = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._close_stale)

    async def _connect(self, scheme: str, host: str, port: int) -> _Connection:
        # Checked here, at connect time, whatever the caller checked before: these are
        # the only addresses a socket is ever connected to.
        check_literal_host(host, self._allow_nets)
        infos: list[aiohappyeyeballs.AddrInfoType] = []
        literal = _literal_family(host)
        if literal is not None:
            address = host.strip("[]")
            sockaddr = (address, port) if literal == socket.AF_INET else (address, port, 0, 0)
            infos.append((literal, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        else:
            for found in await self._guard.resolve(host, port, socket.AF_UNSPEC):
                family = found["family"]
                vetted = found["host"]
                sockaddr = (vetted, port) if family == socket.AF_INET else (vetted, port, 0, 0)
                infos.append((family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._context is None:
                self._context = tls_context(self._tls)
            tls = self._context
        loop = asyncio.get_running_loop()
        sock = await aiohappyeyeballs.start_connection(
            infos, happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY_S, interleave=1
        )
        try:
            _, connection = await loop.create_connection(
                lambda: _Connection(self._open, body_cap=self._body_cap),
                sock=sock,
                ssl=tls,
                # The URL's host: SNI and the name the certificate must carry (an IP
                # literal is matched against the certificate's IP addresses).
                server_hostname=host.strip("[]").rstrip(".") if tls is not None else None,
            )
        except BaseException:
            sock.close()
            raise
        if self.closed:
            connection.close()
            raise RuntimeError("the webhook connections are closed")
        return connection

    @property
    def idle_count(self) -> int:
        """Kept-alive connections waiting for a request, all origins (tests)."""
        return sum(len(idle) for idle in self._idle.values())

    def aclose(self) -> None:
        """Close every connection, idle or in use (an exchange in flight then fails)."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle.clear()
        for connection in list(self._open):
            connection.close()


def _literal_family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP-literal ``host``, or ``None`` for a name."""
    address = host.strip("[]")
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except OSError:
            continue
        return family
    return None


__all__ = ["KEEPALIVE_S", "GuardedConnections", "tls_context"]
