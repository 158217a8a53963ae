"""
The webhook channel: sign, POST, classify, and describe the attempt.

Storage-free by design. One call is one attempt: :meth:`WebhookChannel.deliver` returns
the :data:`~handlers.base.Outcome` and a :class:`WebhookAttempt` record; the caller (the
handlers daemon) persists the attempt, marks the message consumed on ``Delivered``, and
asks :func:`handlers.retry.plan_next` when to try again. Nothing here sleeps between
attempts, keeps attempt counts, or touches the store.
"""

import asyncio
import os
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import TracebackType
from typing import Any, Protocol, Self

import httpx
import structlog

from delivery import __version__
from delivery.clock import Clock
from delivery.jsontext import JsonText
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Message, Outcome, Retry
from handlers.classify import classify_exception, classify_status
from handlers.retry import parse_retry_after
from handlers.ssrf import (
    BlockedAddressError,
    GuardedResolver,
    IPNetwork,
    Resolver,
    check_literal_host,
    parse_allow_nets,
)
from handlers.webhooks.signing import sign
from handlers.webhooks.transport import GuardedConnections

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = timedelta(seconds=15)
"""How long one delivery may take (``DELIVERY_WEBHOOK_TIMEOUT_S``)."""

BODY_LIMIT = 4096
"""Bytes of request and response body kept on an attempt record (truncated beyond this)."""

USER_AGENT = f"sonzai-delivery/{__version__}"


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """
    Where and how one delivery is sent.

    Attributes:
        url: the registered destination (already checked by ``ssrf.check_url`` at
            registration; checked again at connect time here).
        secrets: the active signing secrets, current first
            (``signing.active_secrets``): two during the 24 h after a rotation.
        auth_header: sent verbatim as ``Authorization`` when set.
    """

    url: str
    secrets: tuple[str, ...] = field(repr=False)
    auth_header: str | None = field(default=None, repr=False)


class AttemptStatus(StrEnum):
    """Wire values of an attempt's ``status`` (the attempts endpoint's values)."""

    SUCCESS = "success"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class WebhookAttempt:
    """
    One attempt as the attempts endpoint shows it (its wire fields).

    ``response_code`` is 0 when no response arrived (transport error, timeout, refused
    destination). ``duration_ms`` is the request alone, not the wait for a concurrency
    slot. Bodies are truncated to the channel's ``body_limit``. ``event_id``
    is the correlation id the contract has no field for: it is inside ``request_body``
    too.
    """

    attempt_id: str
    attempt_number: int
    event_id: str
    event_type: str
    project_id: str
    webhook_url: str
    status: AttemptStatus
    response_code: int
    duration_ms: int
    created_at: datetime
    request_body: str
    response_body: str | None
    error_message: str | None


@dataclass(frozen=True, slots=True)
class WebhookDelivery:
    """The result of one attempt: what to do next (``outcome``) and what to record."""

    outcome: Outcome
    attempt: WebhookAttempt


class EndpointDirectory(Protocol):
    """Finds the endpoint for a destination URL; needed only by :meth:`WebhookChannel.send`."""

    async def lookup(self, destination: str, message: Message) -> WebhookEndpoint:
        """The endpoint (secrets, auth header) registered for ``destination``."""
        ...


class AttemptSink(Protocol):
    """Receives every attempt made through :meth:`WebhookChannel.send`."""

    async def record(self, message: Message, delivery: WebhookDelivery) -> None:
        """Persist or forward one attempt record."""
        ...


def _json_default(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_body(message: Message) -> bytes:
    """
    The request body: ``message.payload`` (the notification object) as compact
    UTF-8 JSON. A message built without a payload gets the same shape from its fields.

    The bytes returned are exactly the bytes signed and sent: receivers verify the raw
    body (the Sonzai docs: "do not use the parsed object for verification").
    """
    payload: dict[str, Any] = message.payload or {
        "event_id": message.event_id,
        "event_type": message.event_type,
        "created_at": message.created_at,
        "project_id": message.project_id,
        "agent_id": message.agent_id,
        "user_id": message.user_id,
        "message_id": message.message_id,
        "check_type": message.check_type,
        "intent": message.intent,
        "generated_message": message.generated_message,
    }
    return _encode_body(payload).encode()


_encode_body = JsonText(ensure_ascii=False, default=_json_default)
"""
One encoder for every body, built once (:class:`~delivery.jsontext.JsonText`):
``json.dumps`` building an encoder per call was about a third of the body's encoding
under py-spy in ``bench/bench_webhooks_e2e.py``; the same options write the same bytes.
"""


# C0 controls except horizontal tab, and DEL (RFC 9110 section 5.5 allows neither).
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def header_value_problem(value: str) -> str | None:
    """
    Why ``value`` cannot be sent as an HTTP header value, or ``None`` when it can.

    RFC 9110 section 5.5 allows visible characters, spaces and horizontal tabs in a
    field value, so a tab is accepted. CR and LF would end the header early (header
    injection; aiohttp refuses them), NUL, the other C0 controls and DEL are rejected
    by strict HTTP parsers (h11, llhttp), and non-ASCII cannot be sent at all (httpx
    encodes header values as ASCII): each would fail every delivery attempt. The
    reason never quotes ``value``, which is usually a credential. A character class
    rather than a library: h11 and ``http.client`` keep their field-value checks
    private.
    """
    bad = _HEADER_CONTROL.search(value)
    if bad is not None:
        return (
            "must not contain control characters (CR, LF, NUL, other C0 or DEL); "
            f"found {bad.group()!r} at index {bad.start()}"
        )
    if not value.isascii():
        return "must contain only ASCII characters"
    return None


def _truncate(data: bytes, limit: int) -> str:
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "…[truncated]" if len(data) > limit else text


class _KeyedSemaphores:
    """
    One semaphore per key, created on demand and dropped when nobody holds or waits.

    ``acquire`` / ``release`` rather than an ``asynccontextmanager``: the generator
    machinery of one was about 1.4% of the worker's CPU under py-spy in
    ``bench/bench_webhooks_e2e.py``.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._slots: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    async def acquire(self, key: str) -> None:
        """Take ``key``'s slot; on cancellation nothing is held (or counted)."""
        entry = self._slots.get(key)
        if entry is None:
            entry = self._slots[key] = (asyncio.Semaphore(self._size), [0])
        sem, users = entry
        users[0] += 1
        try:
            await sem.acquire()
        except BaseException:
            self._leave(key, users)
            raise

    def release(self, key: str) -> None:
        """Give back the slot :meth:`acquire` took for ``key``."""
        sem, users = self._slots[key]
        sem.release()
        self._leave(key, users)

    def _leave(self, key: str, users: list[int]) -> None:
        users[0] -= 1
        if users[0] == 0:
            del self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)


_TARGET_CACHE = 4096


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    scheme: str
    host: str
    """The host as sent (IDNA-encoded; an IPv6 literal without brackets)."""
    port: int
    origin: str
    refusal: str | None
    """Why the SSRF guard refuses an IP-literal host; checked once per URL."""
    head: bytes
    """The request line, ``Host`` and the fixed headers, written once per URL."""


class WebhookChannel:
    """
    Signed webhook POSTs, written straight to kept-alive HTTP/1.1 connections.

    Requests go through :class:`~handlers.webhooks.transport.GuardedConnections`, which
    connects only to addresses the SSRF :class:`~handlers.ssrf.GuardedResolver` vetted
    and follows no redirect, reads no proxy from the environment and keeps no cookie
    (a redirect or a proxy would connect somewhere the guard did not check; a cookie jar
    would be shared by every tenant's receiver). A general client was measured first:
    httpx's default pool collapses at high concurrency (encode/httpx#3215: 49 req/s at
    256 in flight), its per-request bookkeeping cost a third of the CPU of a delivery,
    and aiohttp's request path was still about a quarter of the worker's event loop under
    py-spy in ``bench/bench_webhooks_e2e.py``. An injected httpx ``transport`` (tests) is
    driven through ``httpx.Request`` objects instead.

    Concurrency is bounded twice: at most ``per_endpoint`` requests per origin
    (scheme, host, port), then at most ``max_in_flight`` overall. A request waits for its
    origin's slot *before* taking a global one, so a slow endpoint holds at most
    ``per_endpoint`` global slots and cannot starve the others.

    Use as an async context manager, or call :meth:`aclose`.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        allow_nets: Sequence[IPNetwork] = (),
        resolver: Resolver | None = None,
        timeout: timedelta = DEFAULT_TIMEOUT,
        max_in_flight: int = 256,
        per_endpoint: int = 32,
        body_limit: int = BODY_LIMIT,
        directory: EndpointDirectory | None = None,
        attempts: AttemptSink | None = None,
        tls: ssl.SSLContext | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """
        Args:
            clock: signing timestamps and ``created_at`` come from here.
            allow_nets: CIDRs exempt from the SSRF guard (``DELIVERY_WEBHOOK_ALLOW_NETS``).
            resolver: name resolution for the guard; the system resolver by default.
            timeout: the whole attempt, connect to last response byte.
            max_in_flight: global concurrency bound.
            per_endpoint: concurrency bound per origin.
            body_limit: bytes of each body kept on the attempt record.
            directory: endpoint lookup for :meth:`send` (the ``Channel`` seam).
            attempts: where :meth:`send` reports attempts.
            tls: certificate verification (an ``SSLContext``, or ``True`` for the default).
            transport: replaces the direct connections (tests). IP-literal hosts are still
                checked; names are then resolved by that transport, unguarded.
        """
        if max_in_flight < 1 or per_endpoint < 1:
            raise ValueError("max_in_flight and per_endpoint must be at least 1")
        self._clock = clock
        self._allow_nets = tuple(allow_nets)
        self._timeout_s = timeout.total_seconds()
        self._body_limit = body_limit
        self._directory = directory
        self._attempts = attempts
        self._global = asyncio.Semaphore(max_in_flight)
        self._per_endpoint = _KeyedSemaphores(per_endpoint)
        # Connections are at most max_in_flight overall and per_endpoint per origin: the
        # semaphores in deliver bound how many are in use at once.
        self._connections = GuardedConnections(
            GuardedResolver(self._allow_nets, resolver), self._allow_nets, tls, body_limit
        )
        self._transport = transport
        # One deadline per attempt (the connections' own, or asyncio.timeout around an
        # injected transport) bounds connect, send and read together; per-phase
        # transport timeouts would only add timers per request.
        self._timeouts: dict[str, float | None] = {}
        self._targets: dict[str, _Target] = {}

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock, **kwargs: Any) -> Self:
        """A channel configured from ``DELIVERY_WEBHOOK_*`` settings; ``kwargs`` override."""
        options: dict[str, Any] = {
            "allow_nets": parse_allow_nets(settings.webhook_allow_nets),
            "timeout": timedelta(seconds=settings.webhook_timeout_s),
            "max_in_flight": settings.webhook_max_in_flight,
            "per_endpoint": settings.webhook_per_endpoint,
        }
        options.update(kwargs)
        return cls(clock=clock, **options)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection."""
        if self._transport is not None:
            await self._transport.aclose()
        self._connections.aclose()

    @property
    def endpoints_in_flight(self) -> int:
        """Origins with a request in flight or waiting (observability and tests)."""
        return len(self._per_endpoint)

    async def send(self, message: Message, destination: str) -> Outcome:
        """
        The ``Channel`` seam: look the endpoint up, make one attempt, report it.

        The seam carries no attempt count, so the record says attempt 1; callers that
        retry use :meth:`deliver` and pass the number.

        Raises:
            RuntimeError: the channel was built without a ``directory``.
        """
        if self._directory is None:
            raise RuntimeError("WebhookChannel.send needs an EndpointDirectory")
        endpoint = await self._directory.lookup(destination, message)
        result = await self.deliver(message, endpoint)
        if self._attempts is not None:
            await self._attempts.record(message, result)
        return result.outcome

    async def deliver(
        self, message: Message, endpoint: WebhookEndpoint, *, attempt_number: int = 1
    ) -> WebhookDelivery:
        """
        Make one signed delivery attempt of ``message`` to ``endpoint``.

        Never raises for a delivery failure: every failure is an outcome. Cancellation
        propagates (and leaves no record): the attempt is then simply not made.

        Returns:
            ``Delivered`` on 2xx; ``Failed(disable_destination=True)`` on 410;
            ``Failed`` for a refused destination or an unusable URL or secret;
            ``Retry`` (with the receiver's ``Retry-After``) for every other status, a
            timeout or a connection error. The attempt record describes the same.
        """
        created_at = self._clock.now()
        started = time.perf_counter()
        body = b""
        status_code = 0
        response_body: bytes | None = None
        outcome: Outcome
        try:
            body = encode_body(message)
            target = self._target(endpoint.url)
            headers = sign(body, msg_id=message.event_id, secrets=endpoint.secrets, now=created_at)
            # Registration refuses such a header; one stored before that rule, or given
            # by a caller that skipped it, would otherwise be retried for hours.
            if endpoint.auth_header and (bad := header_value_problem(endpoint.auth_header)):
                raise ValueError(f"auth_header {bad}")
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            # A payload, stored URL, secret or auth header that cannot be used will not
            # improve by retrying: fail permanently, and visibly, instead of crashing.
            outcome = Failed(f"cannot send: {exc}")
        else:
            if endpoint.auth_header:
                headers["Authorization"] = endpoint.auth_header
            origin = target.origin
            await self._per_endpoint.acquire(origin)
            try:
                async with self._global:
                    started = time.perf_counter()
                    # The one broad catch of a send (a send is a process edge): whatever
                    # the network does becomes an outcome and an attempt, never a crash.
                    try:
                        if target.refusal is not None:
                            raise BlockedAddressError(target.refusal)
                        status_code, response_body, retry_after = await self._post(
                            target, headers, body
                        )
                    except Exception as exc:
                        outcome = classify_exception(exc)
                    else:
                        after = (
                            None
                            if retry_after is None
                            else parse_retry_after(retry_after, now=self._clock.now())
                        )
                        outcome = classify_status(status_code, retry_after=after)
            finally:
                self._per_endpoint.release(origin)
        duration_ms = round((time.perf_counter() - started) * 1000)
        attempt = WebhookAttempt(
            # 128 random bits as 32 hex digits, the shape a uuid4's hex had; uuid4()
            # itself cost about 10 us a delivery (timeit), os.urandom about 2.
            attempt_id=f"att_{os.urandom(16).hex()}",
            attempt_number=attempt_number,
            event_id=message.event_id,
            event_type=message.event_type,
            project_id=message.project_id,
            webhook_url=endpoint.url,
            status=AttemptStatus.SUCCESS
            if isinstance(outcome, Delivered)
            else AttemptStatus.FAILED,
            response_code=status_code,
            duration_ms=duration_ms,
            created_at=created_at,
            request_body=_truncate(body, self._body_limit),
            response_body=(
                None if response_body is None else _truncate(response_body, self._body_limit)
            ),
            error_message=None if isinstance(outcome, Delivered) else outcome.reason,
        )
        self._log(message, attempt, outcome)
        return WebhookDelivery(outcome=outcome, attempt=attempt)

    def _target(self, url: str) -> "_Target":
        """Parse ``url`` once per channel (URL parsing is a large share of a send's CPU)."""
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _TARGET_CACHE:
                self._targets.clear()
            parsed = httpx.URL(url)
            if parsed.scheme not in ("http", "https") or not parsed.host:
                raise httpx.InvalidURL(f"{endpoint_for_log(url)} is not an absolute http(s) URL")
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            refusal: str | None = None
            try:
                check_literal_host(parsed.host, self._allow_nets)
            except BlockedAddressError as exc:
                refusal = str(exc)
            # netloc is the IDNA-encoded host (IPv6 in brackets) and a non-default port,
            # never the userinfo; raw_path is the path and query, percent-encoded.
            head = b"".join(
                (
                    b"POST ",
                    parsed.raw_path,
                    b" HTTP/1.1\r\nHost: ",
                    parsed.netloc,
                    b"\r\nContent-Type: application/json\r\nUser-Agent: ",
                    USER_AGENT.encode("ascii"),
                    b"\r\n",
                )
            )
            target = _Target(
                parsed,
                parsed.scheme,
                parsed.raw_host.decode("ascii"),
                port,
                f"{parsed.scheme}://{parsed.host}:{port}",
                refusal,
                head,
            )
            self._targets[url] = target
        return target

    async def _post(
        self, target: "_Target", headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes, str | None]:
        if self._transport is not None:
            async with asyncio.timeout(self._timeout_s):
                return await self._post_transport(self._transport, target.url, headers, body)
        # Every value is ASCII without CR or LF: the signature headers are ours, and the
        # auth header passed header_value_problem in deliver.
        lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        request = b"".join(
            (
                target.head,
                lines.encode("ascii"),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        # At most body_limit + 1 bytes of the answer's body are read: enough to record
        # and to know it was cut, without letting a receiver stream gigabytes into our
        # memory; the connection is then closed rather than read to the end.
        return await self._connections.post(
            target.scheme, target.host, target.port, request, self._timeout_s
        )

    async def _post_transport(
        self,
        transport: httpx.AsyncBaseTransport,
        url: httpx.URL,
        headers: dict[str, str],
        body: bytes,
    ) -> tuple[int, bytes, str | None]:
        # The direct path writes these two in each target's head.
        headers = {**headers, "Content-Type": "application/json", "User-Agent": USER_AGENT}
        request = httpx.Request(
            "POST", url, content=body, headers=headers, extensions={"timeout": self._timeouts}
        )
        response = await transport.handle_async_request(request)
        try:
            kept = bytearray()
            # Read at most body_limit + 1 bytes: enough to record and to know it was cut,
            # without letting a receiver stream gigabytes into our memory.
            async for chunk in response.aiter_raw():
                kept += chunk
                if len(kept) > self._body_limit:
                    break
        finally:
            await response.aclose()
        return response.status_code, bytes(kept), response.headers.get("retry-after")

    def _log(self, message: Message, attempt: WebhookAttempt, outcome: Outcome) -> None:
        ids = {
            "event_id": message.event_id,
            "event_type": message.event_type,
            "project_id": message.project_id,
            "attempt_number": attempt.attempt_number,
            "response_code": attempt.response_code,
            "duration_ms": attempt.duration_ms,
        }
        if isinstance(outcome, Delivered):
            # Debug: at thousands of deliveries a second the attempt record is the log.
            log.debug("webhook.delivered", **ids)
            return
        # Origin and path only: a query string may carry a token.
        url = endpoint_for_log(attempt.webhook_url)
        if isinstance(outcome, Retry):
            after = None if outcome.after is None else outcome.after.total_seconds()
            log.info(
                "webhook.attempt_failed",
                reason=outcome.reason,
                retry_after_s=after,
                url=url,
                **ids,
            )
        else:
            log.warning(
                "webhook.attempt_failed_permanently",
                reason=outcome.reason,
                disable_destination=outcome.disable_destination,
                url=url,
                **ids,
            )


def endpoint_for_log(url: str) -> str:
    """``url`` without query, fragment or credentials, safe to log."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "<invalid url>"
    return str(parsed.copy_with(query=None, fragment=None, userinfo=b""))


__all__ = [
    "BODY_LIMIT",
    "DEFAULT_TIMEOUT",
    "AttemptSink",
    "AttemptStatus",
    "EndpointDirectory",
    "WebhookAttempt",
    "WebhookChannel",
    "WebhookDelivery",
    "WebhookEndpoint",
    "encode_body",
    "header_value_problem",
]
