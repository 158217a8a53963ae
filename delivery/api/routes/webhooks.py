"""
Webhook registration, listing, deletion, attempts, secret rotation and recovery,
tenant-scoped (``/api/v1/webhooks``: the key's project) and
project-scoped (``/api/v1/projects/{projectId}/webhooks``; another project's id is 404).

Secrets: a ``whsec_`` signing secret is generated on first registration and on
rotation, returned in that response only, and stored sealed (:mod:`delivery.secrets`);
``auth_header`` is stored sealed and only ever shown masked.
Destinations pass the SSRF check at registration (``handlers.ssrf.check_url``) and
again at send time.

Recovery (``POST …/{eventType}/recover`` with ``since``, ``POST
…/{eventType}/resend/{id}``) puts messages back in the durable delivery queue the
handlers' webhook worker sweeps, so every re-sent attempt is recorded as any other.
Both are idempotent: what is already queued is not queued again (and an
``Idempotency-Key`` replays the first answer).
"""

from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field
from sqlalchemy.engine import RowMapping

from delivery.api.auth import PathProject, ProjectId
from delivery.api.context import ApiContext, Ctx, opt_time, parse_limit, wire_time
from delivery.api.schemas import ID_PATTERN, RequestModel, ResponseModel, Success
from delivery.cadence import parse_instant
from delivery.errors import (
    InvalidRequestError,
    InvalidStateError,
    NotFoundError,
    UnsupportedEventTypeError,
)
from delivery.secrets import SecretBox
from delivery.store.webhooks import (
    EndpointDisabledError,
    EndpointMissingError,
    MessageEndedError,
    WebhookStore,
)
from handlers.ssrf import MAX_URL_LENGTH, Resolver, check_url, parse_allow_nets
from handlers.webhooks.sender import header_value_problem
from handlers.webhooks.signing import generate_secret

router = APIRouter(tags=["webhooks"])
TENANT = "/api/v1/webhooks"
PROJECT = "/api/v1/projects/{project_id}/webhooks"
MAX_PAGE_SIZE = 200
"""Attempts ``page_size`` is 1..200; out of range is an error, never clamped."""

_log = structlog.get_logger(__name__)

EventType = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        description="Webhook event type, e.g. on_wakeup_ready.",
    ),
]


NEVER_PRODUCED: dict[str, str] = {
    "agent.wakeup": (
        "event_type 'agent.wakeup' is sent for wakeups an agent's context engine schedules "
        "on its own, which this service does not do; register 'on_wakeup_ready', which "
        "receives every wakeup that fires"
    ),
}
"""Event types named in the Sonzai API that nothing here emits, and what to use instead."""


class WebhookRegister(RequestModel):
    """``PUT …/webhooks/{eventType}`` body (``UpsertWebhookInputBody``)."""

    webhook_url: str = Field(min_length=1, max_length=MAX_URL_LENGTH)
    auth_header: str | None = Field(default=None, min_length=1, max_length=4096)


class WebhookRegistered(ResponseModel):
    """Register / rotate response: ``signing_secret`` only when a secret was just made."""

    success: bool
    signing_secret: str | None = None


class WebhookOut(ResponseModel):
    """One ``webhooks`` entry (G ``Webhook``)."""

    event_type: str
    webhook_url: str
    is_active: bool
    project_id: str
    created_at: str
    updated_at: str
    auth_header: str | None = None


class WebhookList(ResponseModel):
    webhooks: list[WebhookOut]


class WebhookEnabled(ResponseModel):
    """
    Enable response. When the endpoint had been disabled: when, why, and
    ``recover_since``, the instant to recover from (the first failure of the
    streak that disabled it, else the disable itself).
    """

    success: bool
    was_disabled: bool
    disabled_at: str | None = None
    disabled_reason: str | None = None
    failing_since: str | None = None
    recover_since: str | None = None


class AttemptOut(ResponseModel):
    """One attempt (``WebhookDeliveryAttempt``, parsed with ``extra='forbid'``)."""

    attempt_id: str
    attempt_number: int
    event_type: str
    project_id: str
    webhook_url: str
    status: str
    response_code: int
    duration_ms: int
    created_at: str
    error_message: str | None = None
    request_body: str | None = None
    response_body: str | None = None


class RecoverIn(RequestModel):
    """``POST …/webhooks/{eventType}/recover`` body."""

    since: str = Field(
        min_length=1,
        max_length=64,
        description="RFC 3339 instant with an offset; messages created at or after it",
    )


class RecoverOut(ResponseModel):
    """What a recovery queued: ``requeued`` failed deliveries, ``created`` missing ones."""

    success: bool
    requeued: int
    created: int


class ResendOut(ResponseModel):
    """A re-send: ``queued`` False when the delivery was already waiting to be sent."""

    success: bool
    delivery_id: str
    event_id: str
    queued: bool


class AttemptPageOut(ResponseModel):
    attempts: list[AttemptOut]
    has_more: bool
    next_cursor: str | None = None


def mask_auth_header(value: str) -> str:
    """
    ``auth_header`` as listings show it: the scheme word kept, the credential hidden
    (``Bearer ****``), so a tenant can tell what is set without it leaking.
    """
    scheme, sep, _rest = value.partition(" ")
    return f"{scheme} ****" if sep and len(scheme) <= 32 else "****"


async def _box(ctx: ApiContext) -> SecretBox:
    """The app's :class:`SecretBox`, built on first use (the key file may be created)."""
    return await ctx.secrets.get()


def _store(ctx: ApiContext) -> WebhookStore:
    return ctx.webhooks


def _not_registered(event_type: str) -> NotFoundError:
    return NotFoundError(
        "event_type", f"event_type {event_type!r}: no webhook registered", resource="webhook"
    )


def _entry(row: RowMapping, box: SecretBox | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "event_type": row["event_type"],
        "webhook_url": row["url"],
        "is_active": bool(row["is_active"]),
        "project_id": row["project_id"],
        "created_at": wire_time(row["created_at"]),
        "updated_at": wire_time(row["updated_at"]),
    }
    if row["auth_header_enc"] and box is not None:
        entry["auth_header"] = mask_auth_header(box.open(row["auth_header_enc"]))
    return entry


def _attempt(row: RowMapping) -> dict[str, Any]:
    # Exactly the SDK model's fields: the SDK parses attempts with extra='forbid'.
    entry: dict[str, Any] = {
        "attempt_id": row["id"],
        "attempt_number": row["attempt_number"],
        "event_type": row["event_type"],
        "project_id": row["project_id"],
        "webhook_url": row["webhook_url"],
        "status": row["status"],
        "response_code": row["response_code"],
        "duration_ms": row["duration_ms"],
        "created_at": wire_time(row["created_at"]),
    }
    for key in ("error_message", "request_body", "response_body"):
        if row[key] is not None:
            entry[key] = row[key]
    return entry


async def _register(
    request: Request, ctx: ApiContext, project: str, event_type: str, body: WebhookRegister
) -> Response:
    if event_type in NEVER_PRODUCED:
        # Refused rather than stored: an endpoint that silently never fires is worse.
        raise UnsupportedEventTypeError("event_type", NEVER_PRODUCED[event_type])
    if body.auth_header is not None and (bad := header_value_problem(body.auth_header)):
        # Sent verbatim as the Authorization header: refused now rather than failing
        # every delivery attempt later.
        raise InvalidRequestError("auth_header", f"auth_header {bad}")
    allow = parse_allow_nets(ctx.settings.webhook_allow_nets)
    checked = await check_url(body.webhook_url.strip(), allow, Resolver())
    box = await _box(ctx)
    secret = generate_secret()
    result = await _store(ctx).upsert_endpoint(
        project,
        event_type,
        url=checked.url.strip(),
        auth_header_enc=box.seal(body.auth_header) if body.auth_header else None,
        new_secret_enc=box.seal(secret),
        now=ctx.clock.now(),
    )
    _log.info(
        "webhook.registered",
        project_id=project,
        event_type=event_type,
        endpoint_id=result.endpoint_id,
        first=result.created,
    )
    out: dict[str, Any] = {"success": True}
    if result.created:
        # Shown once; on re-registration the key is omitted, never null.
        out["signing_secret"] = secret
    return JSONResponse(out)


async def _list(request: Request, ctx: ApiContext, project: str) -> Response:
    rows = await _store(ctx).list_endpoints(project)
    box = await _box(ctx) if any(r["auth_header_enc"] for r in rows) else None
    return JSONResponse({"webhooks": [_entry(r, box) for r in rows]})


async def _delete(ctx: ApiContext, project: str, event_type: str) -> Response:
    found = await _store(ctx).delete_endpoint(
        project, event_type, now=ctx.clock.now(), reason="webhook deleted"
    )
    if not found:
        # Idempotent: nothing registered is 204, which the SDK reads as success.
        return Response(status_code=204)
    _log.info("webhook.deleted", project_id=project, event_type=event_type)
    return JSONResponse({"success": True})


async def _attempts(
    ctx: ApiContext, project: str, event_type: str, page_size: str | None, cursor: str | None
) -> Response:
    size = parse_limit(page_size, default=50, maximum=MAX_PAGE_SIZE, field="page_size")
    after: int | None = None
    if cursor:
        if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
            raise InvalidRequestError("cursor", "cursor must be a next_cursor from a previous page")
        after = int(cursor)
    page = await _store(ctx).list_attempts(project, event_type, page_size=size, cursor=after)
    out: dict[str, Any] = {
        "attempts": [_attempt(r) for r in page.rows],
        "has_more": page.next_cursor is not None,
    }
    if page.next_cursor is not None:
        out["next_cursor"] = page.next_cursor
    return JSONResponse(out)


async def _rotate(request: Request, ctx: ApiContext, project: str, event_type: str) -> Response:
    box = await _box(ctx)
    secret = generate_secret()
    rotated = await _store(ctx).rotate_secret(
        project, event_type, new_secret_enc=box.seal(secret), now=ctx.clock.now()
    )
    if not rotated:
        raise _not_registered(event_type)
    _log.info("webhook.secret_rotated", project_id=project, event_type=event_type)
    return JSONResponse({"success": True, "signing_secret": secret})


def _recovery_error(event_type: str, exc: Exception) -> Exception:
    if isinstance(exc, EndpointDisabledError):
        return InvalidStateError(
            "event_type",
            f"event_type {event_type!r}: the endpoint is disabled ({exc.reason}); "
            f"enable it (POST .../webhooks/{event_type}/enable) or register it again, "
            "then recover",
        )
    return _not_registered(event_type)


async def _recover(ctx: ApiContext, project: str, event_type: str, body: RecoverIn) -> Response:
    since = parse_instant(body.since, "since")
    now = ctx.clock.now()
    if since > now:
        raise InvalidRequestError("since", f"since ({body.since}) is in the future")
    try:
        done = await _store(ctx).recover(project, event_type, since=since, now=now)
    except (EndpointMissingError, EndpointDisabledError) as exc:
        raise _recovery_error(event_type, exc) from None
    _log.info(
        "webhook.recovery_queued",
        project_id=project,
        event_type=event_type,
        since=since.isoformat(),
        requeued=done.requeued,
        created=done.created,
    )
    return JSONResponse(
        {"success": True, "requeued": done.requeued, "created": done.created}, status_code=202
    )


async def _resend(ctx: ApiContext, project: str, event_type: str, ident: str) -> Response:
    try:
        done = await _store(ctx).resend(project, event_type, ident, now=ctx.clock.now())
    except (EndpointMissingError, EndpointDisabledError) as exc:
        raise _recovery_error(event_type, exc) from None
    except MessageEndedError as exc:
        raise InvalidStateError(
            "delivery_id",
            f"delivery_id {ident!r}: the message is {exc.status} and is never sent again",
        ) from None
    if done is None:
        raise NotFoundError(
            "delivery_id",
            f"delivery_id {ident!r}: no delivery, attempt or message of {event_type!r}",
            resource="delivery",
        )
    _log.info(
        "webhook.resend_queued",
        project_id=project,
        event_type=event_type,
        delivery_id=done.delivery_id,
        queued=done.queued,
    )
    return JSONResponse(
        {
            "success": True,
            "delivery_id": done.delivery_id,
            "event_id": done.event_id,
            "queued": done.queued,
        },
        status_code=202,
    )


DeliveryRef = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        description="A delivery id, an attempt_id from the attempts list, or the message's "
        "event id (the webhook-id header the receiver saw).",
    ),
]


async def _enable(ctx: ApiContext, project: str, event_type: str) -> Response:
    enabled = await _store(ctx).enable_endpoint(project, event_type, now=ctx.clock.now())
    if enabled is None:
        raise _not_registered(event_type)
    out: dict[str, Any] = {"success": True, "was_disabled": enabled.was_disabled}
    if enabled.was_disabled:
        _log.info(
            "webhook.enabled",
            project_id=project,
            event_type=event_type,
            disabled_reason=enabled.disabled_reason,
        )
        found = {
            "disabled_at": opt_time(enabled.disabled_at),
            "disabled_reason": enabled.disabled_reason,
            "failing_since": opt_time(enabled.failing_since),
            "recover_since": opt_time(enabled.recover_since),
        }
        out |= {key: value for key, value in found.items() if value is not None}
    return JSONResponse(out)


# --- tenant-scoped: the key's project ---------------------------------------------------


@router.get(TENANT, responses={200: {"model": WebhookList}})
async def list_webhooks(request: Request, project: ProjectId, ctx: Ctx) -> Response:
    """Every webhook of the key's project."""
    return await _list(request, ctx, project)


@router.put(TENANT + "/{event_type}", responses={200: {"model": WebhookRegistered}})
async def register_webhook(
    request: Request, event_type: EventType, body: WebhookRegister, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Register or replace the URL for ``event_type``. The signing secret is returned on
    the first registration only; 400 ``INVALID_WEBHOOK_URL`` for a refused destination,
    ``INVALID_REQUEST`` for an ``auth_header`` that cannot be an HTTP header value,
    ``UNSUPPORTED_EVENT_TYPE`` for ``agent.wakeup`` (never sent here: use
    ``on_wakeup_ready``).
    """
    return await _register(request, ctx, project, event_type, body)


@router.delete(
    TENANT + "/{event_type}",
    responses={200: {"model": Success}, 204: {"description": "No webhook registered"}},
)
async def delete_webhook(event_type: EventType, project: ProjectId, ctx: Ctx) -> Response:
    """
    Remove the webhook; pending deliveries end, past attempts stay listed.
    Idempotent: 204 when none is registered.
    """
    return await _delete(ctx, project, event_type)


@router.get(TENANT + "/{event_type}/attempts", responses={200: {"model": AttemptPageOut}})
async def list_attempts(
    event_type: EventType,
    project: ProjectId,
    ctx: Ctx,
    page_size: str | None = None,
    cursor: str | None = None,
) -> Response:
    """Delivery attempts, newest first; ``page_size`` 1..200 (default 50), cursor pages."""
    return await _attempts(ctx, project, event_type, page_size, cursor)


@router.post(TENANT + "/{event_type}/rotate-secret", responses={200: {"model": WebhookRegistered}})
async def rotate_secret(
    request: Request, event_type: EventType, project: ProjectId, ctx: Ctx
) -> Response:
    """A new signing secret; the previous one keeps signing for 24 h. No body is read."""
    return await _rotate(request, ctx, project, event_type)


@router.post(TENANT + "/{event_type}/enable", responses={200: {"model": WebhookEnabled}})
async def enable_webhook(event_type: EventType, project: ProjectId, ctx: Ctx) -> Response:
    """
    Re-enable an endpoint disabled after failing (or a 410), keeping its URL and
    secret; ``recover_since`` says from when to recover. Enabling an active one
    changes nothing (``was_disabled`` false). No body is read.
    """
    return await _enable(ctx, project, event_type)


# --- project-scoped ---------------------------------------------------------------------


@router.get(PROJECT, responses={200: {"model": WebhookList}})
async def list_project_webhooks(request: Request, project: PathProject, ctx: Ctx) -> Response:
    """Every webhook of ``project_id`` (the key's own project, else 404)."""
    return await _list(request, ctx, project)


@router.put(PROJECT + "/{event_type}", responses={200: {"model": WebhookRegistered}})
async def register_project_webhook(
    request: Request,
    event_type: EventType,
    body: WebhookRegister,
    project: PathProject,
    ctx: Ctx,
) -> Response:
    """As the tenant-scoped register, for ``project_id``."""
    return await _register(request, ctx, project, event_type, body)


@router.delete(
    PROJECT + "/{event_type}",
    responses={200: {"model": Success}, 204: {"description": "No webhook registered"}},
)
async def delete_project_webhook(event_type: EventType, project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped delete, for ``project_id``."""
    return await _delete(ctx, project, event_type)


@router.get(PROJECT + "/{event_type}/attempts", responses={200: {"model": AttemptPageOut}})
async def list_project_attempts(
    event_type: EventType,
    project: PathProject,
    ctx: Ctx,
    page_size: str | None = None,
    cursor: str | None = None,
) -> Response:
    """As the tenant-scoped attempts, for ``project_id``."""
    return await _attempts(ctx, project, event_type, page_size, cursor)


@router.post(PROJECT + "/{event_type}/rotate-secret", responses={200: {"model": WebhookRegistered}})
async def rotate_project_secret(
    request: Request, event_type: EventType, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped rotate, for ``project_id``."""
    return await _rotate(request, ctx, project, event_type)


# --- recovery ---------------------------------------------------------------------------


@router.post(
    TENANT + "/{event_type}/recover", status_code=202, responses={202: {"model": RecoverOut}}
)
async def recover_webhook(
    event_type: EventType, body: RecoverIn, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Send again every message of ``event_type`` created at or after ``since`` that the
    endpoint has not received and that is still pending: failed deliveries restart
    their retry schedule, messages it never had (created while it was disabled or not
    registered) are queued. Idempotent: queued or delivered messages are left alone.
    404 when nothing is registered, 409 ``INVALID_STATE`` when the endpoint is disabled.
    """
    return await _recover(ctx, project, event_type, body)


@router.post(
    TENANT + "/{event_type}/resend/{delivery_id}",
    status_code=202,
    responses={202: {"model": ResendOut}},
)
async def resend_webhook(
    event_type: EventType, delivery_id: DeliveryRef, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Send one message again (even one already delivered), through the retry queue.
    Idempotent: a delivery still waiting to be sent is not queued twice
    (``queued`` false). No body is read. 409 ``INVALID_STATE`` when the endpoint is
    disabled, or when the message can never be sent again (past its deadline, or held
    back or replaced by a delivery policy).
    """
    return await _resend(ctx, project, event_type, delivery_id)


@router.post(
    PROJECT + "/{event_type}/recover", status_code=202, responses={202: {"model": RecoverOut}}
)
async def recover_project_webhook(
    event_type: EventType, body: RecoverIn, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped recover, for ``project_id``."""
    return await _recover(ctx, project, event_type, body)


@router.post(
    PROJECT + "/{event_type}/resend/{delivery_id}",
    status_code=202,
    responses={202: {"model": ResendOut}},
)
async def resend_project_webhook(
    event_type: EventType, delivery_id: DeliveryRef, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped resend, for ``project_id``."""
    return await _resend(ctx, project, event_type, delivery_id)


@router.post(PROJECT + "/{event_type}/enable", responses={200: {"model": WebhookEnabled}})
async def enable_project_webhook(event_type: EventType, project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped enable, for ``project_id``."""
    return await _enable(ctx, project, event_type)
