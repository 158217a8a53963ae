"""
Key management for the deployment's operator under ``/admin/v1``: list, create,
revoke and rotate API keys of any project.

These routes exist only when ``DELIVERY_ADMIN_TOKEN`` is set (otherwise every
path answers 404, as an unknown route does) and accept only that token as
``Authorization: Bearer <token>``; tenant API keys never open them. They do the
same as ``delivery keys`` on the command line. A revoked key keeps working on a
running API for at most ``DELIVERY_AUTH_CACHE_TTL_S`` seconds (its key cache).
"""

import hashlib
import hmac
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from delivery.api.context import ApiContext, Ctx
from delivery.api.schemas import ID_PATTERN
from delivery.errors import InvalidRequestError, NotFoundError, UnauthorizedError

router = APIRouter(tags=["admin"])
PREFIX = "/admin/v1/keys"

MAX_GRACE_S = 30 * 24 * 3600
"""A rotated key may outlive its replacement by at most 30 days."""


async def _admin(request: Request, ctx: Ctx) -> ApiContext:
    """
    The context, once the request carries the admin token.

    Raises:
        NotFoundError: no admin token is configured: the routes do not exist.
        UnauthorizedError: no bearer token, or another one.
    """
    token = ctx.settings.admin_token
    if token is None:
        raise NotFoundError("", f"no route {request.url.path}")
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    # Both sides hashed first: the comparison's time does not reveal the token's length.
    expected = hashlib.sha256(token.get_secret_value().encode()).digest()
    digest = hashlib.sha256(given.strip().encode()).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, expected):
        raise UnauthorizedError("", "the admin routes need 'Authorization: Bearer <admin token>'")
    return ctx


Admin = Annotated[ApiContext, Depends(_admin)]
KeyId = Annotated[str, Path(pattern=ID_PATTERN, description="A key's id, from the key list.")]


class KeyCreate(BaseModel):
    """A new key for ``project`` (a project name; created if it is new)."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128)


class KeyRotate(BaseModel):
    """How long the replaced key keeps working (0: it ends now)."""

    model_config = ConfigDict(extra="forbid")

    grace_seconds: int = Field(default=0, ge=0, le=MAX_GRACE_S)


def _missing(key_id: str) -> NotFoundError:
    return NotFoundError("key_id", f"no working API key with id {key_id!r}", resource="api_key")


@router.get(PREFIX)
async def list_keys(
    ctx: Admin, project: Annotated[str | None, Query(max_length=128)] = None
) -> Response:
    """Every key (of one project by name), oldest first; never the keys themselves."""
    infos = await ctx.store.keys.list_keys(project)
    return JSONResponse({"keys": [info.as_json() for info in infos]})


@router.post(PREFIX, status_code=201)
async def create_key(body: KeyCreate, ctx: Admin) -> Response:
    """A new key for the named project; the key is in this answer only."""
    name = body.project.strip()
    if not name:
        raise InvalidRequestError("project", "project must name a project (1 to 128 characters)")
    now = ctx.clock.now()
    project = await ctx.store.keys.ensure_project(name, now)
    key = await ctx.store.keys.create_api_key(project.id, now)
    return JSONResponse({"project_id": project.id, "key": key}, status_code=201)


@router.post(PREFIX + "/{key_id}/revoke")
async def revoke_key(key_id: KeyId, ctx: Admin) -> Response:
    """Revoke a key now; revoking it again changes nothing. 404 for an unknown id."""
    info = await ctx.store.keys.revoke_key(key_id, ctx.clock.now())
    if info is None:
        raise _missing(key_id)
    return JSONResponse(info.as_json())


@router.post(PREFIX + "/{key_id}/rotate")
async def rotate_key(key_id: KeyId, ctx: Admin, body: KeyRotate | None = None) -> Response:
    """
    A new key for the same project; the old one ends after ``grace_seconds``.
    404 for an unknown or already revoked key.
    """
    grace = (body or KeyRotate()).grace_seconds
    rotated = await ctx.store.keys.rotate_key(
        key_id, ctx.clock.now(), grace=timedelta(seconds=grace)
    )
    if rotated is None:
        raise _missing(key_id)
    info, key = rotated
    return JSONResponse({**info.as_json(), "key": key, "replaces": key_id})
