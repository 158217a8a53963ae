"""
``Idempotency-Key`` on every POST / PUT / PATCH (DESIGN decision 12, CONTRACT 2.4).

The SDK retries a POST on 5xx and timeouts with the same key, so the first
response is recorded per (project, ``METHOD path``, key) and replayed for the
TTL. The key is reserved before the route runs, so two concurrent requests with
one key never both execute: the later one waits (up to ``wait_s``) for the first
to finish and replays its answer, or gets 409 ``IDEMPOTENCY_KEY_IN_PROGRESS``.
Only 2xx and 4xx answers are recorded: a 5xx is a fault that the retry should
get another chance at.
"""

import asyncio
import hashlib
import json
from collections.abc import Callable
from datetime import timedelta

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from delivery.clock import Clock
from delivery.errors import (
    BadRequestError,
    ConflictError,
    DeliveryError,
    IdempotencyKeyReusedError,
)
from delivery.secrets import SecretBox
from delivery.store.sql import SqlStore

_METHODS = frozenset({"POST", "PUT", "PATCH"})
_MAX_KEY = 255
_POLL_S = 0.05
_log = structlog.get_logger(__name__)
_SEALED_PREFIX = "sealed:"


class IdempotencyInProgressError(ConflictError):
    code = "IDEMPOTENCY_KEY_IN_PROGRESS"


class IdempotencyMiddleware:
    """
    Pure ASGI middleware below :class:`~delivery.api.auth.AuthMiddleware`.

    Args:
        store: where records live.
        clock: "now" for expiry.
        ttl: how long a response is replayed.
        wait_s: how long a request waits for a concurrent one with the same
            key to finish before it answers 409 ``IDEMPOTENCY_KEY_IN_PROGRESS``.
        box_factory: builds the deployment's :class:`SecretBox`; every recorded
            response is sealed with it.
    """

    def __init__(
        self,
        app: ASGIApp,
        store: SqlStore,
        clock: Clock,
        ttl: timedelta,
        wait_s: float = 10.0,
        box_factory: Callable[[], SecretBox] | None = None,
    ) -> None:
        self.app = app
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self.wait_s = wait_s
        self._box_factory = box_factory
        self._box: SecretBox | None = None

    async def _sealer(self) -> SecretBox:
        # Built on first need only: it may create the key file in the data dir.
        if self._box is None:
            if self._box_factory is None:
                raise RuntimeError("recording a response needs a SecretBox; none is configured")
            self._box = await asyncio.to_thread(self._box_factory)
        return self._box

    async def _stored_body(self, body: bytes) -> str:
        """
        The text to record for a response body: always sealed.

        A signing secret is shown once (CONTRACT 7) and stored only encrypted
        (DESIGN invariant 6), and a replayed first registration must show it
        again. Deciding per body which ones carry a secret would mean knowing
        every route's secrets here (a new credential in a response would be
        stored in clear the day someone forgets); sealing every record costs
        microseconds per write and keeps the rest of the tenant's data
        encrypted at rest too.
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
        claim = await self.store.claim_idempotency_key(
            project, route, key, digest, now=self.clock.now(), ttl=self.ttl
        )
        # The SDK re-sends a POST that timed out while the first attempt may still
        # be running: wait a little for its answer rather than fail the retry.
        waited = 0.0
        while claim.state == "in_progress" and waited < self.wait_s:
            await asyncio.sleep(_POLL_S)
            waited += _POLL_S
            claim = await self.store.claim_idempotency_key(
                project, route, key, digest, now=self.clock.now(), ttl=self.ttl
            )
        if claim.state == "replay":
            _log.info("idempotent replay", route=route, status=claim.status_code)
            replay = await self._replayed_body(claim.body)
            await _send_json(send, claim.status_code, replay, [(b"idempotent-replayed", b"true")])
            return
        if claim.state == "mismatch":
            await _send_error(
                send,
                IdempotencyKeyReusedError(
                    "Idempotency-Key",
                    "this Idempotency-Key was already used on this route with a different body",
                ),
            )
            return
        if claim.state == "in_progress":
            await _send_error(
                send,
                IdempotencyInProgressError(
                    "Idempotency-Key",
                    "a request with this Idempotency-Key is still being processed; retry later",
                ),
            )
            return

        replayed = False

        async def replay_body() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 0
        chunks: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_body, capture)
        except BaseException:
            await self.store.release_idempotency_key(project, route, key)
            raise
        if 200 <= status < 500:
            stored = await self._stored_body(b"".join(chunks))
            await self.store.complete_idempotency_key(project, route, key, status, stored)
        else:
            await self.store.release_idempotency_key(project, route, key)


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
