"""
API key -> project: tenancy is decided here, once: the key alone names the project.

:class:`AuthMiddleware` answers 401 for every ``/api/`` request without a valid
``Authorization: Bearer <key>`` before any body is parsed, and otherwise puts the
project id in ``scope["state"]``; routes read it with :func:`project_id`.

:class:`OpsTokenMiddleware` guards the operator endpoints (``/metrics`` and the
OpenAPI pages) with ``DELIVERY_OPS_TOKEN`` when it is set; tenant keys never open them.
"""

import hashlib
import hmac
import json
import time
from collections.abc import Collection, Sequence
from typing import Annotated

from fastapi import Depends, Path, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from delivery.api.schemas import ID_PATTERN
from delivery.clock import Clock
from delivery.errors import NotFoundError, UnauthorizedError
from delivery.ops import operator_credential
from delivery.settings import Settings
from delivery.store.keys import hash_api_key
from delivery.store.sql import SqlStore

PROTECTED_PREFIX = "/api/"


async def bootstrap_key(settings: Settings, store: SqlStore, clock: Clock) -> None:
    """Store ``DELIVERY_BOOTSTRAP_API_KEY`` for project ``default`` when it is set (local use)."""
    if settings.bootstrap_api_key is None:
        return
    project = await store.keys.ensure_project("default", clock.now())
    await store.keys.create_api_key(
        project.id, clock.now(), key=settings.bootstrap_api_key.get_secret_value()
    )


class Authenticator:
    """
    Resolves API keys to project ids, caching hits for ``ttl_s`` seconds.

    The cache spares the hot polling path a lookup per request; the price is
    that a revoked key keeps working for at most ``ttl_s``.
    """

    def __init__(
        self, store: SqlStore, clock: Clock, ttl_s: float = 30.0, max_entries: int = 10_000
    ) -> None:
        self._store = store
        self._clock = clock
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._cache: dict[str, tuple[str, float]] = {}

    async def project_for(self, authorization: str | None) -> str:
        """
        The project of the bearer key in an ``Authorization`` header value.

        Raises:
            UnauthorizedError: no header, another scheme, or an unknown / revoked key.
        """
        if not authorization:
            raise UnauthorizedError("", "missing Authorization: Bearer <api key> header")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise UnauthorizedError("", "the Authorization header must be 'Bearer <api key>'")
        digest = hash_api_key(key)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        project = await self._store.keys.project_for_key(key, self._clock.now())
        if project is None:
            raise UnauthorizedError("", "invalid or revoked API key")
        if len(self._cache) >= self._max_entries:
            self._cache.clear()
        self._cache[digest] = (project, now + self._ttl_s)
        return project


class AuthMiddleware:
    """Pure ASGI middleware: authenticate ``/api/`` requests before routing."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            project = await self.authenticator.project_for(header)
        except UnauthorizedError as exc:
            await send_unauthorized(send, exc, [b"Bearer"])
            return
        scope.setdefault("state", {})["project_id"] = project
        await self.app(scope, receive, send)


async def send_unauthorized(
    send: Send, exc: UnauthorizedError, challenges: Sequence[bytes]
) -> None:
    """Answer 401 with the API's error body and one ``WWW-Authenticate`` per challenge."""
    body = json.dumps(exc.to_body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(b"www-authenticate", challenge) for challenge in challenges]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


OPS_REALM = "delivery-ops"
_OPS_CHALLENGES = (
    f'Bearer realm="{OPS_REALM}"'.encode(),
    f'Basic realm="{OPS_REALM}", charset="UTF-8"'.encode(),
)


class OpsTokenMiddleware:
    """
    Pure ASGI middleware: the operator endpoints need ``DELIVERY_OPS_TOKEN``.

    Accepted as ``Authorization: Bearer <token>`` (curl, Prometheus'
    ``authorization`` / ``bearer_token`` settings) or as the password of Basic
    authentication with any user name. Basic is for the browser: it cannot put a
    bearer header on a page it navigates to (``/docs``), but on a 401 that offers
    Basic it asks for credentials once and then sends them itself, also with Swagger
    UI's fetch of ``/openapi.json`` (same origin, same realm). A query parameter
    would also work in a browser, and was not taken: a token in a URL is written to
    access logs, browser history and ``Referer`` headers.

    Both sides are hashed before the constant-time comparison, so the time taken
    does not depend on the stored token, not even on its length.

    Args:
        app: the wrapped application.
        token: the operator token.
        paths: the exact request paths it guards; every other path passes through.
    """

    def __init__(self, app: ASGIApp, token: str, paths: Collection[str]) -> None:
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest()
        self._paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self._paths:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if header is None:
            error = UnauthorizedError(
                "",
                f"{scope['path']} needs the operator token (DELIVERY_OPS_TOKEN): "
                "send 'Authorization: Bearer <token>', or Basic with it as the password",
            )
            await send_unauthorized(send, error, _OPS_CHALLENGES)
            return
        given = operator_credential(header)
        digest = hashlib.sha256((given or "").encode()).digest()
        if given is None or not hmac.compare_digest(digest, self._digest):
            error = UnauthorizedError("", "invalid operator token (DELIVERY_OPS_TOKEN)")
            await send_unauthorized(send, error, _OPS_CHALLENGES)
            return
        await self.app(scope, receive, send)


def project_of(request: Request) -> str:
    """The authenticated caller's project id (set by :class:`AuthMiddleware`)."""
    project = getattr(request.state, "project_id", None)
    if not isinstance(project, str):  # pragma: no cover - the middleware always sets it
        raise UnauthorizedError("", "missing Authorization: Bearer <api key> header")
    return project


async def _project_id(request: Request) -> str:  # async: see context._ctx
    return project_of(request)


ProjectId = Annotated[str, Depends(_project_id)]
"""Route parameter type: the authenticated caller's project id."""


async def _path_project(
    request: Request,
    project_id: Annotated[str, Path(pattern=ID_PATTERN, description="The key's own project.")],
) -> str:
    project = await _project_id(request)
    # Another project's id answers exactly like an unknown one: tenants cannot
    # even learn which project ids exist.
    if project_id != project:
        raise NotFoundError(
            "project_id", f"project_id {project_id!r}: no such project", resource="project"
        )
    return project


PathProject = Annotated[str, Depends(_path_project)]
"""
Route parameter type for ``/api/v1/projects/{project_id}/...``: the caller's
project id, when the path names it; any other id is a 404.
"""
