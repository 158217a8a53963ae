"""
The tenant side of a webhook: a FastAPI router that authenticates deliveries and hands
them on.

It verifies either signature scheme on the raw body (5-minute tolerance, constant-time
comparison), drops replays by event id, and passes each verified payload once to a
:class:`Forwarder`. Mount it with :func:`create_receiver_router`; ``README.md`` beside
this file shows how.
"""

import asyncio
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from delivery.clock import Clock, SystemClock
from handlers.webhooks.signing import (
    TOLERANCE,
    Scheme,
    SignatureError,
    SigningKey,
    verify,
)

log = structlog.get_logger(__name__)

DEFAULT_PATH = "/webhooks/sonzai"
MAX_BODY_BYTES = 1024 * 1024

DEDUPE_TTL = timedelta(hours=48)
"""How long an event id is remembered. Longer than the whole retry schedule (about 27.6 h,
``handlers.retry.SCHEDULE``), so a redelivery whose 2xx got lost is still recognised;
far longer than the 5-minute signature tolerance that bounds a captured-request replay."""


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    """
    An authenticated delivery.

    Attributes:
        event_id: the dedupe key: ``webhook-id`` (Standard scheme) or the body's
            ``event_id`` (Sonzai scheme).
        event_type: the body's ``event_type`` (``""`` when absent).
        payload: the parsed JSON object (the webhook payload).
        scheme: which signature authenticated it.
        signed_at: the signed timestamp.
        raw_body: the exact bytes that were verified.
    """

    event_id: str
    event_type: str
    payload: dict[str, Any]
    scheme: Scheme
    signed_at: datetime
    raw_body: bytes = field(repr=False)


class Forwarder(Protocol):
    """
    Where verified events go (the channel handlers of the next issue plug in here).

    Raising makes the receiver answer 503, so the sender retries the event later; the
    event id is not remembered as seen in that case.
    """

    async def forward(self, event: VerifiedEvent) -> None:
        """Handle one verified event; called at most once per event id while remembered."""
        ...


class LoggingForwarder:
    """The default forwarder: one structured log line per event."""

    async def forward(self, event: VerifiedEvent) -> None:
        log.info(
            "webhook.received",
            event_id=event.event_id,
            event_type=event.event_type,
            scheme=event.scheme.value,
            agent_id=event.payload.get("agent_id"),
            user_id=event.payload.get("user_id"),
            message_id=event.payload.get("message_id"),
        )


class Claim(StrEnum):
    """What :meth:`Dedupe.claim` found."""

    NEW = "new"
    """Not seen: the caller now holds it and must ``complete`` or ``release`` it."""
    DUPLICATE = "duplicate"
    """Already handled: acknowledge without forwarding again."""
    IN_PROGRESS = "in_progress"
    """Another request is handling it right now: ask the sender to retry."""


class Dedupe(Protocol):
    """
    Replay and redelivery guard keyed on event id.

    Contract: ``claim`` is atomic per key; a key that was claimed and ``complete``\\ d
    answers ``DUPLICATE`` until it expires; a ``release``\\ d key is forgotten, so the
    next delivery of that event is ``NEW`` again.
    """

    async def claim(self, key: str, now: datetime) -> Claim:
        """Try to take ``key`` for handling."""
        ...

    async def complete(self, key: str, now: datetime) -> None:
        """Mark ``key`` handled (remembered from ``now`` for the TTL)."""
        ...

    async def release(self, key: str) -> None:
        """Forget a claim whose handling failed."""
        ...


class InMemoryDedupe:
    """
    A bounded, TTL-expiring :class:`Dedupe` for one process.

    At most ``max_entries`` keys are kept; beyond that the oldest are dropped first
    (a dropped key can be forwarded twice, which the at-least-once contract allows).
    Several receiver replicas need a shared implementation instead.
    """

    def __init__(self, *, ttl: timedelta = DEDUPE_TTL, max_entries: int = 100_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._done: OrderedDict[str, datetime] = OrderedDict()
        self._pending: set[str] = set()

    def _expire(self, now: datetime) -> None:
        while self._done:
            key, at = next(iter(self._done.items()))
            if now - at < self._ttl and len(self._done) <= self._max:
                break
            del self._done[key]

    async def claim(self, key: str, now: datetime) -> Claim:
        self._expire(now)
        if key in self._pending:
            return Claim.IN_PROGRESS
        if key in self._done:
            return Claim.DUPLICATE
        self._pending.add(key)
        return Claim.NEW

    async def complete(self, key: str, now: datetime) -> None:
        self._pending.discard(key)
        self._done[key] = now
        self._done.move_to_end(key)
        self._expire(now)

    async def release(self, key: str) -> None:
        self._pending.discard(key)

    def __len__(self) -> int:
        return len(self._done) + len(self._pending)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def create_receiver_router(
    secrets: Sequence[str],
    *,
    forwarder: Forwarder | None = None,
    dedupe: Dedupe | None = None,
    clock: Clock | None = None,
    path: str = DEFAULT_PATH,
    tolerance: timedelta = TOLERANCE,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> APIRouter:
    """
    A router with one ``POST path`` that accepts signed deliveries.

    Args:
        secrets: every secret to accept (``whsec_...``); during a rotation, both.
        forwarder: receives each verified event once; :class:`LoggingForwarder` by default.
        dedupe: replay guard; a fresh :class:`InMemoryDedupe` by default.
        clock: "now" for the timestamp tolerance.
        path: the route path.
        tolerance: maximum distance between the signed timestamp and now.
        max_body_bytes: larger bodies are refused with 413.

    Responses:
        200 ``{"success": true, "event_id", "duplicate"}``: forwarded, or a duplicate
        acknowledged without forwarding. A duplicate is answered 2xx on purpose: it is
        usually a retry whose first 2xx was lost, and any other status would make the
        sender retry a message already handled until it dead-letters it.
        400 ``{code, message}``: ``MALFORMED_SIGNATURE`` or ``INVALID_PAYLOAD``.
        401: ``MISSING_SIGNATURE``, ``INVALID_SIGNATURE``, ``TIMESTAMP_OUT_OF_TOLERANCE``.
        409 ``DELIVERY_IN_PROGRESS``: the same event is being handled concurrently.
        413 ``PAYLOAD_TOO_LARGE``; 503 ``FORWARD_FAILED``: the forwarder raised.

    Raises:
        ValueError: no secret, or a secret that is not ``whsec_`` + base64.
    """
    keys = tuple(SigningKey.parse(s) for s in secrets)
    if not keys:
        raise ValueError("the webhook receiver needs at least one signing secret")
    sink: Forwarder = forwarder or LoggingForwarder()
    seen: Dedupe = dedupe or InMemoryDedupe()
    time_source: Clock = clock or SystemClock()
    router = APIRouter()

    @router.post(path, summary="Receive a signed webhook delivery", response_model=None)
    async def receive_webhook(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return _error(413, "PAYLOAD_TOO_LARGE", f"body exceeds {max_body_bytes} bytes")
        # The RAW body: both schemes sign bytes, never a re-serialised object.
        body = await request.body()
        if len(body) > max_body_bytes:
            return _error(413, "PAYLOAD_TOO_LARGE", f"body exceeds {max_body_bytes} bytes")
        now = time_source.now()
        try:
            proof = verify(body, request.headers, keys, now=now, tolerance=tolerance)
        except SignatureError as exc:
            log.warning("webhook.rejected", code=exc.code, reason=str(exc))
            return _error(exc.status, exc.code, str(exc))
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            payload = None
        if not isinstance(payload, dict):
            return _error(400, "INVALID_PAYLOAD", "the body must be a JSON object")
        event_id = proof.msg_id or payload.get("event_id")
        if not isinstance(event_id, str) or not event_id:
            return _error(400, "INVALID_PAYLOAD", "the body has no event_id to dedupe on")
        event_type = payload.get("event_type")
        event = VerifiedEvent(
            event_id=event_id,
            event_type=event_type if isinstance(event_type, str) else "",
            payload=payload,
            scheme=proof.scheme,
            signed_at=proof.signed_at,
            raw_body=body,
        )
        bound = log.bind(event_id=event_id, event_type=event.event_type)
        claim = await seen.claim(event_id, now)
        if claim is Claim.DUPLICATE:
            bound.info("webhook.duplicate")
            return JSONResponse({"success": True, "event_id": event_id, "duplicate": True})
        if claim is Claim.IN_PROGRESS:
            return _error(409, "DELIVERY_IN_PROGRESS", f"event {event_id} is being handled")
        # An HTTP handler is a process edge: any forwarder failure becomes a
        # 503 so the sender retries, and the claim is released so that retry forwards.
        try:
            await sink.forward(event)
        except asyncio.CancelledError:
            await seen.release(event_id)
            raise
        except Exception:
            await seen.release(event_id)
            bound.exception("webhook.forward_failed")
            return _error(503, "FORWARD_FAILED", "the event could not be forwarded; retry")
        await seen.complete(event_id, time_source.now())
        return JSONResponse({"success": True, "event_id": event_id, "duplicate": False})

    return router


def create_receiver_app(
    secrets: Sequence[str],
    *,
    forwarder: Forwarder | None = None,
    clock: Clock | None = None,
    path: str = DEFAULT_PATH,
) -> FastAPI:
    """A standalone app serving the receiver router (``delivery receiver``) and ``/health``."""
    app = FastAPI(title="sonzai-delivery webhook receiver", docs_url=None, redoc_url=None)
    app.include_router(create_receiver_router(secrets, forwarder=forwarder, clock=clock, path=path))

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
