"""
``Idempotency-Key`` on every POST / PUT / PATCH, for 24 hours, per project and route.

The SDK retries a POST on 5xx and timeouts with the same key, so the first
answer is recorded per (project, ``METHOD path``, key) and replayed for the TTL.
The record commits in the same transaction as the writes it describes (the
request runs inside a :func:`~delivery.store.engine.unit_of_work`, and its
answer is held back until that commit): after a crash at any point a retry
either replays a committed answer or runs the request for the first time, never
both, and there is no reservation left behind to wait out. Two concurrent
requests with one key may both run, but only the first to commit keeps its
writes; the other is rolled back and answers from the first's record. Only 2xx
and 4xx answers are recorded: a 5xx is a fault that the retry should get another
chance at, and its writes are rolled back.
"""

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from delivery.api.limits import replaying
from delivery.api.metrics import bind_answered_ids, unbind_created_ids
from delivery.clock import Clock
from delivery.errors import BadRequestError, ConflictError, DeliveryError, IdempotencyKeyReusedError
from delivery.secrets import LazySecretBox, SecretBox
from delivery.store.engine import unit_of_work
from delivery.store.idempotency import IdempotencyRecord, Recorded, idempotency_row
from delivery.store.sql import SqlStore

_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MAX_KEY = 255
_log = structlog.get_logger(__name__)
_SEALED_PREFIX = "sealed:"


class IdempotencyInProgressError(ConflictError):
    """A 409 for a key whose record disappeared between two reads (a purge); retry."""

    code = "IDEMPOTENCY_KEY_IN_PROGRESS"


class IdempotencyMiddleware:
    """
    Pure ASGI middleware below :class:`~delivery.api.auth.AuthMiddleware`.

    Args:
        store: where records live.
        clock: "now" for expiry.
        ttl: how long a response is replayed.
        secrets: the deployment's secret box; every recorded
            response is sealed with it.
        self_recording: ``METHOD path`` patterns of routes that take the
            request's :class:`IdempotencyClaim` and check the key themselves,
            in the transaction of their write: the read of the key before the
            route runs is skipped for them (a retry runs the route again and is
            answered from the record its write finds).
    """

    def __init__(
        self,
        app: ASGIApp,
        store: SqlStore,
        clock: Clock,
        ttl: timedelta,
        secrets: LazySecretBox | None = None,
        self_recording: Sequence[re.Pattern[str]] = (),
    ) -> None:
        self.app = app
        self._self_recording = tuple(self_recording)
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self._secrets = secrets

    async def _sealer(self) -> SecretBox:
        if self._secrets is None:
            raise RuntimeError("recording a response needs a SecretBox; none is configured")
        return await self._secrets.get()

    async def _stored_body(self, body: bytes) -> str:
        """
        The text to record for a response body: always sealed.

        A signing secret is shown once and stored only encrypted, and a replayed
        first registration must show it again. Deciding per body which ones carry
        a secret would mean knowing every route's secrets here (a new credential
        in a response would be stored in clear the day someone forgets); sealing
        every record costs microseconds per write and keeps the rest of the
        tenant's data encrypted at rest too.
        """
        return _SEALED_PREFIX + (await self._sealer()).seal(body.decode())

    async def _replayed_body(self, stored: str) -> bytes:
        # Records from before every body was sealed are replayed as they are.
        if not stored.startswith(_SEALED_PREFIX):
            return stored.encode()
        return (await self._sealer()).open(stored.removeprefix(_SEALED_PREFIX)).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        project = scope.get("state", {}).get("project_id")
        if scope["type"] != "http" or scope["method"] not in _METHODS or project is None:
            await self.app(scope, receive, send)
            return
        key = ""
        for name, value in scope["headers"]:
            if name == b"idempotency-key":
                key = value.decode("latin-1").strip()
                break
        if not key:
            await self.app(scope, receive, send)
            return
        if len(key) > _MAX_KEY:
            await _send_error(
                send,
                InvalidIdempotencyKeyError(
                    "Idempotency-Key", f"Idempotency-Key is longer than {_MAX_KEY} characters"
                ),
            )
            return

        body = await _read_body(receive)
        route = f"{scope['method']} {scope['path']}"[:512]
        digest = hashlib.sha256(body).hexdigest()
        now = self.clock.now()
        if not any(pattern.fullmatch(route) for pattern in self._self_recording):
            record = await self.store.idempotency.find_idempotency_record(
                project, route, key, now=now
            )
            if record is not None:
                await self._answer_from(send, record, digest, route)
                return

        answer = _HeldResponse()
        claim = IdempotencyClaim(self, project, route, key, digest, now)
        scope.setdefault("state", {})[CLAIM_STATE] = claim
        async with unit_of_work(self.store.engine) as unit:
            await self.app(scope, replaying(body, receive), answer.hold)
            if claim.taken:
                # The route wrote its record with its writes (or failed to):
                # nothing is left to record here.
                if claim.replayed:
                    await unit.rollback()
                    await self._answer_from(send, claim.replay, digest, route)
                    return
                await unit.commit()
            elif 200 <= answer.status < 500:
                recorded = await self.store.idempotency.record_idempotency(
                    project,
                    route,
                    key,
                    digest,
                    status_code=answer.status,
                    body=await self._stored_body(answer.body),
                    now=now,
                    ttl=self.ttl,
                )
                if recorded:
                    await unit.commit()
                else:
                    await unit.rollback()
                    record = await self.store.idempotency.find_idempotency_record(
                        project, route, key, now=self.clock.now()
                    )
                    await self._answer_from(send, record, digest, route)
                    return
            # A 5xx leaves the block uncommitted: its writes roll back with it.
        await answer.release(send)

    async def _answer_from(
        self, send: Send, record: IdempotencyRecord | None, digest: str, route: str
    ) -> None:
        """
        Answer a request whose key already has a record (None: it vanished meanwhile).

        A self-recording route ran before this and bound the ids it made up; none of
        them was written, so the request's log lines name the record's ids instead
        (:func:`~delivery.api.metrics.bind_answered_ids`), or none.
        """
        unbind_created_ids()
        if record is None:
            # Only a purge between two statements gets here; the retry runs afresh.
            await _send_error(
                send,
                IdempotencyInProgressError(
                    "Idempotency-Key", "this Idempotency-Key changed state meanwhile; retry"
                ),
            )
        elif record.request_hash != digest:
            await _send_error(
                send,
                IdempotencyKeyReusedError(
                    "Idempotency-Key",
                    "this Idempotency-Key was already used on this route with a different body",
                ),
            )
        else:
            replay = await self._replayed_body(record.body)
            bind_answered_ids(replay)
            _log.info("idempotent replay", route=route, status=record.status_code)
            await _send_json(send, record.status_code, replay, [(b"idempotent-replayed", b"true")])


CLAIM_STATE = "idempotency_claim"
"""The key of a request's :class:`IdempotencyClaim` in its ASGI scope's ``state``."""


class IdempotencyClaim:
    """
    A request's ``Idempotency-Key``, for a route that records its answer itself.

    The middleware records a route's answer after the route returns, in the
    request's unit of work. A route whose write is committed elsewhere (the
    grouped event writes of :mod:`delivery.api.ingest`, the wakeup and schedule
    creations through :func:`write_recorded_answer`) instead takes the claim,
    builds the record with :meth:`record` and commits it with its writes; when
    its key turns out to have a record already, it says so with
    :meth:`replay_from` and the middleware answers from that record.
    """

    def __init__(
        self,
        middleware: "IdempotencyMiddleware",
        project: str,
        route: str,
        key: str,
        digest: str,
        now: datetime,
    ) -> None:
        self._middleware = middleware
        self.project = project
        self.route = route
        self.key = key
        self.digest = digest
        self.now = now
        self.taken = False
        self.replayed = False
        self.replay: IdempotencyRecord | None = None

    async def record(self, status_code: int, body: bytes) -> dict[str, Any]:
        """Take the claim; the record of answering ``status_code`` with ``body``."""
        self.taken = True
        return idempotency_row(
            self.project,
            self.route,
            self.key,
            self.digest,
            status_code=status_code,
            body=await self._middleware._stored_body(body),
            now=self.now,
            ttl=self._middleware.ttl,
        )

    def replay_from(self, record: IdempotencyRecord | None) -> None:
        """
        The key had a live record (None: it vanished meanwhile); the middleware
        answers from it, whatever the route returns.
        """
        self.replayed = True
        self.replay = record


async def write_recorded_answer(
    request: Request,
    answer: Response,
    write: Callable[[Mapping[str, Any] | None], Awaitable[Recorded]],
) -> Recorded:
    """
    Run ``write`` with the record of ``answer`` when the request has an
    ``Idempotency-Key`` (the store commits both in one transaction, or answers
    from the record the key already has); what it did. A write its guard
    refused (``moved``: built on the wrong pair clock) recorded nothing, and the
    route may build its answer again and call this once more.

    For the routes listed as self-recording in :class:`IdempotencyMiddleware`:
    the middleware's read before the route and its separate recording
    transaction (a BEGIN, a savepoint and a commit, each a round trip to
    SQLite's driver thread) were a third of a keyed wakeup POST's server CPU.
    """
    claim: IdempotencyClaim | None = getattr(request.state, CLAIM_STATE, None)
    record = None if claim is None else await claim.record(answer.status_code, bytes(answer.body))
    outcome = await write(record)
    if claim is not None:
        if outcome.moved:
            # Nothing was recorded: until the route writes again, its answer (a
            # 4xx from the pair's clock, say) is the middleware's to record.
            claim.taken = False
        elif not outcome.written:
            claim.replay_from(outcome.replay)
    return outcome


class _HeldResponse:
    """A route's answer, held back until its writes and their record have committed."""

    def __init__(self) -> None:
        self.status = 0
        self._messages: list[Message] = []

    async def hold(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        self._messages.append(message)

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self._messages if m["type"] == "http.response.body"
        )

    async def release(self, send: Send) -> None:
        for message in self._messages:
            await send(message)


class InvalidIdempotencyKeyError(BadRequestError):
    """A 400 for a malformed ``Idempotency-Key`` header."""

    code = "INVALID_IDEMPOTENCY_KEY"


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts)


async def _send_json(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Send, error: DeliveryError) -> None:
    await _send_json(send, error.status, json.dumps(error.to_body()).encode())
