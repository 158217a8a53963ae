"""
Notification channels: ``/api/v1/channels`` (the key's project) and
``/api/v1/projects/{projectId}/channels`` (another project's id is 404), list / create /
get / update (PUT, full replace) / delete / deliver.

Types are ``webhook`` and ``email`` only; anything else, ``composio``
included, is 400 ``UNSUPPORTED_CHANNEL_TYPE`` and the SDK's ``Channel.type`` literal is
never broken. Secret config keys (``api_key``, ``secret``, ...) are stored sealed and
always answered masked, except a webhook signing secret the server generated, which
the create response shows once. ``deliver`` is declared before
the ``{channelId}`` routes so it can never be captured by them.
"""

import dataclasses
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.engine import RowMapping

from delivery.api.auth import PathProject, ProjectId
from delivery.api.context import ApiContext, Ctx, ResourceId, parse_limit, wire_time
from delivery.api.routes.contacts import attempt_entry
from delivery.api.schemas import RequestModel
from delivery.errors import (
    InvalidRequestError,
    InvalidWebhookUrlError,
    NotFoundError,
    UnsupportedChannelTypeError,
)
from delivery.secrets import SecretDecryptError
from delivery.settings import Settings
from delivery.store.channels import ChannelConfigCodec, ChannelStore
from delivery.store.common import canonical_json, new_id
from handlers.channels_worker import channel_attempt
from handlers.contacts import normalize_email
from handlers.notification_channels import (
    ChannelTarget,
    filter_matches,
    send_event,
    subscribed,
)
from handlers.ssrf import Resolver, check_url, parse_allow_nets
from handlers.webhooks.sender import header_value_problem
from handlers.webhooks.signing import SigningKey, generate_secret

router = APIRouter(tags=["channels"])
TENANT = "/api/v1/channels"
PROJECT = "/api/v1/projects/{project_id}/channels"
CHANNEL_TYPES = ("webhook", "email")
MAX_NAME = 128
MAX_EVENTS = 64
MAX_EVENT_TYPE = 128
MAX_JSON_BYTES = 16 * 1024
MAX_RECIPIENTS = 50

_log = structlog.get_logger(__name__)


class ChannelWriteBody(RequestModel):
    """``ChannelWriteBody``: the SDK never sends unknown keys or nulls."""

    name: str
    type: str
    config: dict[str, Any] | None = None
    events: list[str] | None = None
    filter: dict[str, Any] | None = None
    active: bool | None = None


class ChannelDeliverBody(RequestModel):
    """``ChannelDeliverBody``: an event type and the payload channels receive."""

    event_type: str
    payload: dict[str, Any] | None = None


# --- pure helpers ---------------------------------------------------------------------


def _json_size(value: Any, field: str) -> str:
    text = canonical_json(value)
    if len(text.encode()) > MAX_JSON_BYTES:
        raise InvalidRequestError(field, f"{field} is larger than 16 KiB as JSON")
    return text


def _events(events: Sequence[str] | None) -> list[str]:
    """Validated, de-duplicated event types in the caller's order; ``[]`` means all."""
    if not events:
        return []
    if len(events) > MAX_EVENTS:
        raise InvalidRequestError("events", f"events has more than {MAX_EVENTS} entries")
    seen: dict[str, None] = {}
    for i, event in enumerate(events):
        if not event.strip() or len(event) > MAX_EVENT_TYPE:
            raise InvalidRequestError(
                f"events.{i}", f"events.{i} must be a non-empty event type of at most 128 chars"
            )
        seen.setdefault(event, None)
    return list(seen)


def _recipients(value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or len(items) > MAX_RECIPIENTS:
        raise InvalidRequestError(
            "config.to", f"config.to must be an email address or a list of 1 to {MAX_RECIPIENTS}"
        )
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidRequestError(f"config.to.{i}", f"config.to.{i} must be a string")
        try:
            out.append(normalize_email(item, field=f"config.to.{i}"))
        except ValueError as exc:
            raise InvalidRequestError(f"config.to.{i}", str(exc)) from None
    return out


# --- request plumbing -------------------------------------------------------------------


async def _codec(ctx: ApiContext) -> ChannelConfigCodec:
    """A codec over the app's secret box (built on first use: it may create a file)."""
    return ChannelConfigCodec(await ctx.secrets.get())


def _store(ctx: ApiContext) -> ChannelStore:
    return ctx.channels


def _no_channel(channel_id: str) -> NotFoundError:
    return NotFoundError(
        "channel_id", f"channel_id {channel_id!r}: no such channel", resource="channel"
    )


def channel_entry(
    row: RowMapping, codec: ChannelConfigCodec, *, reveal: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """
    The channel object (G ``ChannelDTO``: exactly these keys, ``events`` never null,
    ``filter`` omitted when unset). ``reveal`` shows generated secrets in clear (create).
    """
    try:
        config = codec.masked(row)
    except SecretDecryptError:
        # A rotated server key must not make the channel unreadable; its secrets are
        # lost either way, and the listing should say so rather than fail.
        _log.error("channels.secret_undecryptable", channel_id=row["id"])
        config = json.loads(row["config_json"])
    config.update(reveal or {})
    entry: dict[str, Any] = {
        "channel_id": row["id"],
        "project_id": row["project_id"],
        "name": row["name"],
        "type": row["type"],
        "config": config,
        "events": json.loads(row["events_json"]),
        "active": row["active"],
        "created_at": wire_time(row["created_at"]),
        "updated_at": wire_time(row["updated_at"]),
    }
    if row["filter_json"] is not None:
        entry["filter"] = json.loads(row["filter_json"])
    return entry


async def _validate(
    body: ChannelWriteBody, settings: Settings, config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """
    Check a write body; return the config to store and any secret generated for it.

    Raises:
        UnsupportedChannelTypeError: ``type`` is not webhook or email.
        InvalidRequestError / InvalidWebhookUrlError: a field breaks its rule.
    """
    if body.type not in CHANNEL_TYPES:
        raise UnsupportedChannelTypeError(
            "type",
            f"type {body.type!r} is not supported; use webhook or email "
            "(push and SMS reach users through contacts)",
        )
    if not body.name.strip() or len(body.name) > MAX_NAME:
        raise InvalidRequestError("name", f"name must be 1 to {MAX_NAME} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in body.name):
        # PostgreSQL text cannot hold NUL, and no display name needs control characters.
        raise InvalidRequestError("name", "name must not contain control characters")
    _json_size(config, "config")
    generated: dict[str, str] = {}
    if body.type == "webhook":
        url = config.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequestError("config.url", "config.url is required for a webhook")
        try:
            await check_url(url, parse_allow_nets(settings.webhook_allow_nets), Resolver())
        except InvalidWebhookUrlError as exc:
            raise InvalidWebhookUrlError(
                "config.url", exc.message.replace("webhook_url", "config.url")
            ) from None
        auth = config.get("auth_header")
        if isinstance(auth, str) and (bad := header_value_problem(auth)):
            # Sent as the Authorization header on every delivery (``_deliver_one``).
            raise InvalidRequestError("config.auth_header", f"config.auth_header {bad}")
        secret = config.get("secret")
        if secret is None:
            generated["secret"] = config["secret"] = generate_secret()
        elif not isinstance(secret, str):
            raise InvalidRequestError("config.secret", "config.secret must be a string")
        else:
            try:
                SigningKey.parse(secret)
            except ValueError:
                raise InvalidRequestError(
                    "config.secret", "config.secret must be whsec_ followed by base64"
                ) from None
    else:
        sender = config.get("from")
        if sender is not None:
            if not isinstance(sender, str):
                raise InvalidRequestError("config.from", "config.from must be an email address")
            try:
                config["from"] = normalize_email(sender, field="config.from")
            except ValueError as exc:
                raise InvalidRequestError("config.from", str(exc)) from None
        if "to" in config:
            config["to"] = _recipients(config["to"])
    return config, generated


def _row_values(
    body: ChannelWriteBody, config: Mapping[str, Any], codec: ChannelConfigCodec
) -> dict[str, Any]:
    sealed = codec.seal(config)
    return {
        "name": body.name,
        "type": body.type,
        "config_json": sealed.config_json,
        "secrets_enc": sealed.secrets_enc,
        "events_json": canonical_json(_events(body.events)),
        "filter_json": None if body.filter is None else _json_size(body.filter, "filter"),
        "active": True if body.active is None else body.active,
    }


# --- operations (shared by the tenant and project routes) -----------------------------


async def _list(project: str, request: Request, ctx: ApiContext) -> Response:
    codec = await _codec(ctx)
    rows = await _store(ctx).list_channels(project)
    return JSONResponse({"channels": [channel_entry(r, codec) for r in rows]})


async def _create(
    project: str, body: ChannelWriteBody, request: Request, ctx: ApiContext
) -> Response:
    codec = await _codec(ctx)
    config, generated = await _validate(body, ctx.settings, dict(body.config or {}))
    now = ctx.clock.now()
    values = _row_values(body, config, codec)
    channel_id = new_id("ch")
    values.update(id=channel_id, project_id=project, created_at=now, updated_at=now)
    store = _store(ctx)
    await store.insert_channel(values)
    row = await store.get_channel(project, channel_id)
    if row is None:  # pragma: no cover - just inserted in this project
        raise _no_channel(channel_id)
    _log.info("channels.created", channel_id=channel_id, type=body.type)
    return JSONResponse(channel_entry(row, codec, reveal=generated), status_code=201)


async def _get(project: str, channel_id: str, request: Request, ctx: ApiContext) -> Response:
    codec = await _codec(ctx)
    row = await _store(ctx).get_channel(project, channel_id)
    if row is None:
        raise _no_channel(channel_id)
    return JSONResponse(channel_entry(row, codec))


async def _update(
    project: str, channel_id: str, body: ChannelWriteBody, request: Request, ctx: ApiContext
) -> Response:
    codec = await _codec(ctx)
    store = _store(ctx)
    old = await store.get_channel(project, channel_id)
    if old is None:
        raise _no_channel(channel_id)
    config = dict(body.config or {})
    if old["type"] == body.type:
        # A client that read the channel and writes it back sends the masks; keep secrets.
        config = codec.merge_masked(config, old["secrets_enc"])
        if body.type == "webhook" and "secret" not in config:
            # Regenerating a signing secret on an update would silently break the
            # receiver's verification; an omitted secret keeps the stored one.
            kept = codec.secrets(old["secrets_enc"]).get("secret")
            if kept:
                config["secret"] = kept
    config, generated = await _validate(body, ctx.settings, config)
    values = _row_values(body, config, codec)
    values["updated_at"] = ctx.clock.now()
    row = await store.replace_channel(project, channel_id, values)
    if row is None:
        raise _no_channel(channel_id)
    _log.info("channels.updated", channel_id=channel_id, type=body.type)
    return JSONResponse(channel_entry(row, codec, reveal=generated))


async def _delete(project: str, channel_id: str, ctx: ApiContext) -> Response:
    # Idempotent: an unknown id is 204 too, so a retried delete never fails.
    if await _store(ctx).delete_channel(project, channel_id):
        _log.info("channels.deleted", channel_id=channel_id)
    return Response(status_code=204)


async def _deliver(
    project: str, body: ChannelDeliverBody, request: Request, ctx: ApiContext
) -> Response:
    """
    Send ``payload`` once to every active channel subscribed to ``event_type`` whose
    filter matches; one delivery result per such channel, in channel order. One
    channel failing never stops another.
    """
    if not body.event_type.strip() or len(body.event_type) > MAX_EVENT_TYPE:
        raise InvalidRequestError("event_type", "event_type must be 1 to 128 characters")
    payload = dict(body.payload or {})
    _json_size(payload, "payload")
    codec = await _codec(ctx)
    rows = [
        r
        for r in await _store(ctx).list_channels(project, active_only=True)
        if subscribed(json.loads(r["events_json"]), body.event_type)
        and filter_matches(json.loads(r["filter_json"]) if r["filter_json"] else None, payload)
    ]
    if not rows:
        return JSONResponse({"deliveries": []})
    event_id = new_id("dlv")
    targets = []
    for row in rows:
        try:
            config: Mapping[str, Any] | None = codec.full(row)
        except SecretDecryptError:
            config = None
        targets.append(ChannelTarget(row["id"], row["type"], config))
    now = ctx.clock.now()
    sends = await send_event(
        project,
        body.event_type,
        payload,
        targets,
        event_id=event_id,
        settings=ctx.settings,
        clock=ctx.clock,
        now=now,
    )
    # Each send is recorded before the answer (a deliver has no notification: the
    # attempts carry the event id, and are not retried: the caller has the result).
    event = {
        "id": event_id,
        "project_id": project,
        "agent_id": str(payload.get("agent_id", "")),
        "user_id": str(payload.get("user_id", "")),
    }
    await _store(ctx).record_attempts(
        [
            dataclasses.replace(
                channel_attempt(event, t.id, send, 1, now=now, rand=random.random)[0],
                next_attempt_at=None,
            )
            for t, send in zip(targets, sends, strict=True)
        ]
    )
    deliveries = [send.result for send in sends]
    _log.info(
        "channels.delivered",
        event_id=event_id,
        event_type=body.event_type,
        results=[d["status"] for d in deliveries],
    )
    return JSONResponse({"deliveries": list(deliveries)})


# --- routes: deliver first, so POST …/deliver is never read as a channel id ----------


@router.post(TENANT + "/deliver")
async def deliver(
    body: ChannelDeliverBody, project: ProjectId, request: Request, ctx: Ctx
) -> Response:
    """Deliver an event to the project's matching active channels now."""
    return await _deliver(project, body, request, ctx)


@router.post(PROJECT + "/deliver")
async def deliver_for_project(
    body: ChannelDeliverBody,
    project: PathProject,
    request: Request,
    ctx: Ctx,
) -> Response:
    """Project-scoped :func:`deliver`."""
    return await _deliver(project, body, request, ctx)


async def _attempts(project: str, channel_id: str, limit: str | None, ctx: ApiContext) -> Response:
    count = parse_limit(limit, default=50, maximum=500)
    if await _store(ctx).get_channel(project, channel_id) is None:
        raise NotFoundError(
            "channel_id", f"channel_id {channel_id!r}: no such channel", resource="channel"
        )
    rows = await _store(ctx).list_channel_attempts(project, channel_id, limit=count)
    return JSONResponse({"attempts": [attempt_entry(r) for r in rows]})


@router.get(TENANT + "/{channel_id}/attempts")
async def list_attempts(
    channel_id: ResourceId, project: ProjectId, ctx: Ctx, limit: str | None = None
) -> Response:
    """
    The channel's send attempts, newest first (proactive events routed to it and
    ``deliver`` calls); ``limit`` 1..500 (default 50); 404 for an unknown channel.
    """
    return await _attempts(project, channel_id, limit, ctx)


@router.get(PROJECT + "/{channel_id}/attempts")
async def list_attempts_for_project(
    channel_id: ResourceId, project: PathProject, ctx: Ctx, limit: str | None = None
) -> Response:
    """Project-scoped :func:`list_attempts`."""
    return await _attempts(project, channel_id, limit, ctx)


@router.get(TENANT)
async def list_channels(project: ProjectId, request: Request, ctx: Ctx) -> Response:
    """``{"channels": [...]}``, oldest first."""
    return await _list(project, request, ctx)


@router.get(PROJECT)
async def list_channels_for_project(project: PathProject, request: Request, ctx: Ctx) -> Response:
    """Project-scoped :func:`list_channels`."""
    return await _list(project, request, ctx)


@router.post(TENANT, status_code=201)
async def create_channel(
    body: ChannelWriteBody, project: ProjectId, request: Request, ctx: Ctx
) -> Response:
    """Create a channel (201); a generated webhook ``secret`` is shown in clear once."""
    return await _create(project, body, request, ctx)


@router.post(PROJECT, status_code=201)
async def create_channel_for_project(
    body: ChannelWriteBody,
    project: PathProject,
    request: Request,
    ctx: Ctx,
) -> Response:
    """Project-scoped :func:`create_channel`."""
    return await _create(project, body, request, ctx)


@router.get(TENANT + "/{channel_id}")
async def get_channel(
    channel_id: ResourceId, project: ProjectId, request: Request, ctx: Ctx
) -> Response:
    """One channel, secrets masked; 404 when unknown."""
    return await _get(project, channel_id, request, ctx)


@router.get(PROJECT + "/{channel_id}")
async def get_channel_for_project(
    channel_id: ResourceId,
    project: PathProject,
    request: Request,
    ctx: Ctx,
) -> Response:
    """Project-scoped :func:`get_channel`."""
    return await _get(project, channel_id, request, ctx)


@router.put(TENANT + "/{channel_id}")
async def update_channel(
    channel_id: ResourceId,
    body: ChannelWriteBody,
    project: ProjectId,
    request: Request,
    ctx: Ctx,
) -> Response:
    """
    Full replace: ``name`` and ``type`` are required again, omitted optionals reset to
    their defaults; a secret sent back in its masked form keeps the stored secret.
    """
    return await _update(project, channel_id, body, request, ctx)


@router.put(PROJECT + "/{channel_id}")
async def update_channel_for_project(
    channel_id: ResourceId,
    body: ChannelWriteBody,
    project: PathProject,
    request: Request,
    ctx: Ctx,
) -> Response:
    """Project-scoped :func:`update_channel`."""
    return await _update(project, channel_id, body, request, ctx)


@router.delete(TENANT + "/{channel_id}", status_code=204)
async def delete_channel(channel_id: ResourceId, project: ProjectId, ctx: Ctx) -> Response:
    """Delete (204); idempotent: an unknown id is 204 too."""
    return await _delete(project, channel_id, ctx)


@router.delete(PROJECT + "/{channel_id}", status_code=204)
async def delete_channel_for_project(
    channel_id: ResourceId, project: PathProject, ctx: Ctx
) -> Response:
    """Project-scoped :func:`delete_channel`."""
    return await _delete(project, channel_id, ctx)
