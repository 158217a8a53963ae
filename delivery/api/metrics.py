"""
Request context and Prometheus metrics for the API.

:class:`RequestContextMiddleware` is the one outermost middleware: it gives every
request an id (``X-Request-ID``, echoed back), binds it into structlog's context
so every log line of the request carries it, logs one line per request (INFO, or
ERROR for a 5xx), feeds the app's :class:`~delivery.metrics.HttpMetrics` and, when
tracing is on, makes the request a span.

Every series is labelled with the route *template*
(``/api/v1/agents/{agent_id}/...``). An answer given before routing ran (401 from
authentication, an idempotent replay or 409, 413 / 408 from the body limit) has
its template looked up against the app's routes, so only a path that matches no
route is ``unmatched``.
"""

import json
import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

import structlog
from opentelemetry import trace
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from delivery import tracing
from delivery.api.dispatch import UNMATCHED, RouteIndex
from delivery.domain import notification_id
from delivery.metrics import HttpMetrics

__all__ = [
    "HttpMetrics",
    "RequestContextMiddleware",
    "RouteIndex",
    "bind_answered_ids",
    "bind_ids",
    "route_template",
    "unbind_created_ids",
]

_log = structlog.get_logger("delivery.api")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REPLAYED = (b"idempotent-replayed", b"true")
ROUTE_IDS = ("message_id", "event_id", "wakeup_id", "schedule_id", "agent_id", "user_id")
"""What a route may bind (:func:`bind_ids`); unbound when its request ends."""
CREATED_IDS = ("message_id", "event_id", "wakeup_id", "schedule_id")
"""The ids a create route makes up before its write: true only once it is written."""
_MESSAGE_SOURCES = ("event_id", "wakeup_id")
"""Answer fields whose id is a message's source (its id is derived from them)."""


def bind_ids(**ids: str) -> None:
    """
    Bind the ids a write route learns (message, schedule, agent, user) into the
    request's log context: its access line and every later line of the request
    carry them, so one grep of a message id finds the request that caused it.
    """
    structlog.contextvars.bind_contextvars(**ids)


def unbind_created_ids() -> None:
    """
    Drop the ids a create route bound (:data:`CREATED_IDS`): its write was not made
    (the request is answered from an ``Idempotency-Key`` record, or refused by it),
    so no later line of the request may name them. The agent and user stay: they
    are the request's own.
    """
    structlog.contextvars.unbind_contextvars(*CREATED_IDS)


def bind_answered_ids(body: bytes) -> None:
    """
    Bind the created ids a recorded answer names (``event_id``, ``wakeup_id`` and
    their message, ``schedule_id``) in place of those the route bound: a keyed
    replay logs what the first request created, never the id its own run made up.
    """
    unbind_created_ids()
    try:
        answer = json.loads(body)
    except ValueError:
        return
    if not isinstance(answer, dict):
        return
    ids: dict[str, str] = {}
    for name in ("schedule_id", *_MESSAGE_SOURCES):
        value = answer.get(name)
        if isinstance(value, str) and value:
            ids[name] = value
            if name in _MESSAGE_SOURCES:
                ids["message_id"] = notification_id(value)
    if ids:
        structlog.contextvars.bind_contextvars(**ids)


def route_template(scope: Scope, index: RouteIndex | None = None) -> str:
    """
    The template of the route that answered (or would have answered) the request.

    Routing sets ``scope["route"]``; when a middleware answered first, the path is
    looked up in ``index``.
    """
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", UNMATCHED))
    return index.template(scope) if index is not None else UNMATCHED


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """
    Headers with ``Content-Type: application/json``.

    The API only speaks JSON, and ``curl -d`` sends a form content type by
    default; FastAPI would then not parse the body and answer a puzzling
    "input should be an object". Reading every body as JSON is kinder, and a
    body that is not JSON still gets a clear ``INVALID_REQUEST``.
    """
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    kept.append((b"content-type", b"application/json"))
    return kept


class RequestContextMiddleware:
    """Pure ASGI middleware: request id, structlog binding, access log line, metrics, span."""

    def __init__(
        self, app: ASGIApp, metrics: HttpMetrics, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = RouteIndex(routes)
        """Every route of the app: the templates of answers given before routing."""
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        """(method, route, status) -> its counter and histogram children (labels() is slow)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
                break
        if scope["method"] in _BODY_METHODS and scope["path"].startswith("/api/"):
            scope["headers"] = _as_json(scope["headers"])
        if not _REQUEST_ID.match(request_id):
            request_id = f"req_{secrets.token_hex(10)}"
        status = 500
        replayed = False
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, replayed
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                replayed = _REPLAYED in headers
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        metrics = self.metrics
        metrics.in_flight.inc()
        # Bound for the request and reset to what was there before when it ends, as
        # structlog's bound_contextvars does, without its copy of the whole context
        # on entry (~10 us a request).
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            span = _start_span(scope) if tracing.enabled() else None
            try:
                if span is None:
                    await self.app(scope, receive, send_with_id)
                else:
                    with trace.use_span(span, end_on_exit=False):
                        await self.app(scope, receive, send_with_id)
            except Exception as exc:
                # Logged here, where the request id is still bound; Starlette's
                # outermost error middleware then answers the 500 body.
                _log.exception("unhandled error", error=type(exc).__name__)
                raise
            finally:
                metrics.in_flight.dec()
                elapsed = time.perf_counter() - started
                method = scope["method"]
                route = route_template(scope, self.routes)
                series = self._series.get((method, route, status))
                if series is None:
                    series = self._series[(method, route, status)] = (
                        metrics.requests.labels(method, route, str(status)),
                        metrics.duration.labels(method, route),
                    )
                series[0].inc()
                series[1].observe(elapsed)
                if replayed:
                    metrics.replays.labels(route).inc()
                elif status == 401:
                    metrics.auth_failures.labels(route).inc()
                if span is not None:
                    _end_span(span, method, route, status)
                (_log.error if status >= 500 else _log.info)(
                    "request",
                    method=method,
                    route=route,
                    path=scope["path"],
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                )
                structlog.contextvars.unbind_contextvars(*ROUTE_IDS)
        finally:
            structlog.contextvars.reset_contextvars(**tokens)


def _start_span(scope: Scope) -> trace.Span:
    incoming: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name in (b"traceparent", b"tracestate"):
            incoming[name.decode()] = value.decode("latin-1")
    return tracing.start_span(
        f"HTTP {scope['method']}",
        incoming or None,
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
    )


def _end_span(span: trace.Span, method: str, route: str, status: int) -> None:
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.StatusCode.ERROR)
    span.end()
