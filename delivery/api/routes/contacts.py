"""
Contacts, channel preferences and channel attempts of one user (push,
email and SMS; beyond the SDK, so the shapes are ours).

``/api/v1/agents/{agentId}/users/{userId}/contacts``: add (upsert on kind +
destination), list, get, opt out / in (PATCH), remove. ``.../channel-preferences``:
which channel kinds each ``check_type`` may use. ``.../channel-attempts``: every push,
email and SMS attempt made for the user (the operator's delivery log).
Validation is ``handlers.contacts`` (pure); every rejection is 400 ``INVALID_CONTACT``
naming the field, and nothing is written. Destinations are stored sealed
(``delivery.store.channels``) and answered in clear, as they were given.
"""

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field
from sqlalchemy.engine import RowMapping

from delivery.api.auth import ProjectId
from delivery.api.context import (
    AgentId,
    ApiContext,
    Ctx,
    ResourceId,
    UserId,
    check_id,
    opt_time,
    parse_limit,
    wire_time,
)
from delivery.api.schemas import RequestModel
from delivery.errors import InvalidContactError, NotFoundError
from delivery.store.channels import ChannelStore
from handlers.contacts import validate_contact, validate_preferences

router = APIRouter(tags=["contacts"])
USER_PREFIX = "/api/v1/agents/{agent_id}/users/{user_id}"

MAX_PREFERENCE_KEYS = 128


class ContactBody(RequestModel):
    """``POST .../contacts``: one destination of the user."""

    kind: str = Field(description="fcm | email | sms")
    destination: str = Field(
        description="FCM registration token, email address, or E.164 phone number."
    )
    opted_out: bool = False


class ContactPatch(RequestModel):
    """``PATCH .../contacts/{contactId}``: the user opts out of (or back into) it."""

    opted_out: bool


class PreferencesBody(RequestModel):
    """``PUT .../channel-preferences``: ``{check_type or "*": [kind, ...]}``; ``{}`` clears."""

    preferences: dict[str, list[str]]


def contact_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    """The wire form of a contact; absent optionals are omitted, never null."""
    entry: dict[str, Any] = {
        "contact_id": row["id"],
        "agent_id": row["agent_id"],
        "user_id": row["user_id"],
        "kind": row["kind"],
        "destination": row["destination"],
        "opted_out": row["opted_out"],
        "disabled": row["disabled"],
        "created_at": wire_time(row["created_at"]),
        "updated_at": wire_time(row["updated_at"]),
    }
    if row["disabled_reason"]:
        entry["disabled_reason"] = row["disabled_reason"]
    if row["disabled_at"] is not None:
        entry["disabled_at"] = wire_time(row["disabled_at"])
    return entry


def attempt_entry(row: RowMapping) -> dict[str, Any]:
    """The wire form of one channel attempt (destination redacted)."""
    entry: dict[str, Any] = {
        "attempt_id": row["id"],
        "notification_id": row["notification_id"],
        "kind": row["kind"],
        "destination": row["destination"],
        "status": row["status"],
        "response_code": row["response_code"],
        "duration_ms": row["duration_ms"],
        "attempt_number": row["attempt_number"],
        "created_at": wire_time(row["created_at"]),
    }
    if row["contact_id"]:
        entry["contact_id"] = row["contact_id"]
    if row["channel_id"]:
        entry["channel_id"] = row["channel_id"]
    if row["reason"]:
        entry["reason"] = row["reason"]
    next_at = opt_time(row["next_attempt_at"])
    if next_at is not None:
        entry["next_attempt_at"] = next_at
    return entry


def _store(ctx: ApiContext) -> ChannelStore:
    return ctx.channels


async def _contact_store(request: Request) -> ChannelStore:
    """The app's channel store (its box for destinations is built on first use)."""
    ctx: ApiContext = request.app.state.ctx
    return ctx.channels


Contacts = Annotated[ChannelStore, Depends(_contact_store)]


def _no_contact(contact_id: str) -> NotFoundError:
    return NotFoundError(
        "contact_id", f"contact_id {contact_id!r}: no such contact", resource="contact"
    )


@router.post(USER_PREFIX + "/contacts", status_code=201)
async def add_contact(
    agent_id: AgentId,
    user_id: UserId,
    body: ContactBody,
    project: ProjectId,
    ctx: Ctx,
    contacts: Contacts,
) -> Response:
    """
    Add a destination (201), or update the existing one with the same kind and
    normalised destination (200: its opt-out flag is set and it is re-enabled).
    """
    contact = validate_contact(body.kind, body.destination, opted_out=body.opted_out)
    row, created = await contacts.add_contact(
        project,
        agent_id,
        user_id,
        kind=contact.kind.value,
        destination=contact.destination,
        opted_out=contact.opted_out,
        now=ctx.clock.now(),
    )
    return JSONResponse(contact_entry(row), status_code=201 if created else 200)


@router.get(USER_PREFIX + "/contacts")
async def list_contacts(
    agent_id: AgentId, user_id: UserId, project: ProjectId, contacts: Contacts
) -> Response:
    """Every contact of the user, oldest first, disabled and opted-out ones included."""
    rows = await contacts.list_contacts(project, agent_id, user_id)
    return JSONResponse({"contacts": [contact_entry(r) for r in rows]})


@router.get(USER_PREFIX + "/contacts/{contact_id}")
async def get_contact(
    agent_id: AgentId,
    user_id: UserId,
    contact_id: ResourceId,
    project: ProjectId,
    contacts: Contacts,
) -> Response:
    """One contact; 404 when unknown."""
    row = await contacts.get_contact(project, agent_id, user_id, contact_id)
    if row is None:
        raise _no_contact(contact_id)
    return JSONResponse(contact_entry(row))


@router.patch(USER_PREFIX + "/contacts/{contact_id}")
async def patch_contact(
    agent_id: AgentId,
    user_id: UserId,
    contact_id: ResourceId,
    body: ContactPatch,
    project: ProjectId,
    ctx: Ctx,
    contacts: Contacts,
) -> Response:
    """Opt the contact out (``true``) or back in (``false``)."""
    row = await contacts.set_opted_out(
        project, agent_id, user_id, contact_id, opted_out=body.opted_out, now=ctx.clock.now()
    )
    if row is None:
        raise _no_contact(contact_id)
    return JSONResponse(contact_entry(row))


@router.delete(USER_PREFIX + "/contacts/{contact_id}", status_code=204)
async def delete_contact(
    agent_id: AgentId, user_id: UserId, contact_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """Remove the contact (204); idempotent: an unknown id is 204 too."""
    await _store(ctx).delete_contact(project, agent_id, user_id, contact_id)
    return Response(status_code=204)


@router.get(USER_PREFIX + "/channel-preferences")
async def get_preferences(
    agent_id: AgentId, user_id: UserId, project: ProjectId, ctx: Ctx
) -> Response:
    """``{"preferences": {...}}``; ``{}`` means every channel for every check_type."""
    prefs = await _store(ctx).get_preferences(project, agent_id, user_id)
    return JSONResponse({"preferences": prefs})


@router.put(USER_PREFIX + "/channel-preferences")
async def put_preferences(
    agent_id: AgentId, user_id: UserId, body: PreferencesBody, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Replace the preferences. Resolution per message (``handlers.contacts.channels_for``):
    the ``check_type`` entry, else ``"*"``, else every channel; ``[]`` means none.
    """
    if len(body.preferences) > MAX_PREFERENCE_KEYS:
        raise InvalidContactError(
            "preferences", f"preferences has more than {MAX_PREFERENCE_KEYS} check types"
        )
    for check_type in body.preferences:
        if len(check_type) > 128:
            raise InvalidContactError(
                "preferences", "preferences keys are check types of at most 128 characters"
            )
    validate_preferences(body.preferences)
    # Validated above; the order is kept, as the channel fallback tries kinds in it.
    stored = {key: list(dict.fromkeys(kinds)) for key, kinds in body.preferences.items()}
    await _store(ctx).put_preferences(project, agent_id, user_id, stored, ctx.clock.now())
    return JSONResponse({"preferences": stored})


@router.get(USER_PREFIX + "/channel-attempts")
async def list_channel_attempts(
    agent_id: AgentId,
    user_id: UserId,
    project: ProjectId,
    ctx: Ctx,
    notification_id: str | None = None,
    limit: str | None = None,
) -> Response:
    """The user's push / email / SMS attempts, newest first; ``limit`` 1..500 (default 50)."""
    count = parse_limit(limit, default=50, maximum=500)
    check_id(notification_id, "notification_id")
    rows = await _store(ctx).list_attempts(
        project, agent_id, user_id, notification_id=notification_id or None, limit=count
    )
    return JSONResponse({"attempts": [attempt_entry(r) for r in rows]})
