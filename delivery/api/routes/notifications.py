"""
The agent's polling queue and the project view, over one table.

The agent-queue list is the hot read path (``bench/bench_notifications.py``):
one indexed Core query and dicts built directly, no per-row model validation.
"""

import base64
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.engine import RowMapping

from delivery.api.auth import PathProject, ProjectId, project_of
from delivery.api.context import (
    AgentId,
    ApiContext,
    Ctx,
    ResourceId,
    check_id,
    check_label,
    parse_limit,
    wire_time,
)
from delivery.api.schemas import (
    ID_PATTERN,
    AcknowledgeBody,
    Acknowledged,
    InboxBulk,
    InboxCountsOut,
    InboxEntryOut,
    InboxUpdated,
    NotificationList,
    ProjectNotificationList,
    Success,
)
from delivery.errors import InvalidIdError, InvalidRequestError, InvalidStateError, NotFoundError
from delivery.store.notifications import ConsumeOutcome, InboxAction, InboxFilter

router = APIRouter(tags=["notifications"])
AGENT_PREFIX = "/api/v1/agents/{agent_id}/notifications"
PROJECT_PREFIX = "/api/v1/projects/{project_id}/notifications"
QUEUE_STATUSES = ("pending", "consumed", "expired", "failed_generation")
ALL_STATUSES = "all"
"""``status=all``: every visible status at once (an inbox view)."""
INCLUDE_INBOX = "inbox"
"""``include=inbox``: entries carry ``seen_at`` / ``read_at`` / ``archived_at``."""
ACK_STATUSES = ("pending", "acknowledged", "all")


def queue_entry(row: Mapping[str, Any] | RowMapping) -> dict[str, Any]:
    """
    One agent-queue entry: exactly the SDK model's fields, absent optionals omitted.

    ``wakeup_id`` appears only for wakeup-sourced messages (the SDK model has no
    other provenance field).
    """
    entry: dict[str, Any] = {
        "message_id": row["id"],
        "agent_id": row["agent_id"],
        "user_id": row["user_id"],
        "check_type": row["check_type"],
        "generated_message": row["generated_message"],
        "status": row["status"],
        "created_at": wire_time(row["created_at"]),
    }
    if row["consumed_at"] is not None:
        entry["consumed_at"] = wire_time(row["consumed_at"])
    if row["source_type"] == "wakeup" and row["wakeup_id"]:
        entry["wakeup_id"] = row["wakeup_id"]
    if row["intent"]:
        entry["intent"] = row["intent"]
    return entry


def inbox_entry(row: Mapping[str, Any] | RowMapping) -> dict[str, Any]:
    """A queue entry plus its inbox instants (each only when set)."""
    entry = queue_entry(row)
    for name in ("seen_at", "read_at", "archived_at"):
        if row[name] is not None:
            entry[name] = wire_time(row[name])
    return entry


def _flag(raw: str | None, field: str) -> bool | None:
    """A ``true`` / ``false`` query flag; absent is ``None``; anything else a 400."""
    if raw is None or raw == "":
        return None
    if raw in ("true", "false"):
        return raw == "true"
    raise InvalidRequestError(field, f"{field} must be true or false")


def _query_parameter(name: str) -> dict[str, Any]:
    """The OpenAPI entry FastAPI writes for an optional ``str | None`` query parameter."""
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "title": name.replace("_", " ").title(),
        },
    }


_AGENT_ID = re.compile(ID_PATTERN)
_AGENT_DOC = "Agent id; created on first use."
_QUEUE_PARAMETERS = [
    {
        "name": "agent_id",
        "in": "path",
        "required": True,
        "schema": {
            "type": "string",
            "pattern": ID_PATTERN,
            "description": _AGENT_DOC,
            "title": "Agent Id",
        },
        "description": _AGENT_DOC,
    },
    *(
        _query_parameter(name)
        for name in ("status", "user_id", "limit", "seen", "read", "archived", "include")
    ),
]
"""
The polling read's parameters as FastAPI documented them when it parsed them itself
(``tests/api/test_openapi.py`` holds the document to that).
"""


@router.get(
    AGENT_PREFIX,
    responses={200: {"model": NotificationList}},
    openapi_extra={"parameters": _QUEUE_PARAMETERS},
)
async def list_notifications(request: Request) -> Response:
    """
    The agent's queue in one ``status`` (default pending; ``all`` for every
    status), oldest first; ``limit`` 1..500. ``seen``, ``read`` and ``archived``
    (``true`` / ``false``) keep only the messages in that inbox state;
    ``include=inbox`` adds ``seen_at`` / ``read_at`` / ``archived_at`` to each entry.
    """
    # The polling read, the API's most frequent request: its parameters are read
    # here rather than declared, since FastAPI's per-request dependency solving
    # and pydantic checks of nine parameters were a fifth of its server CPU
    # (bench/bench_api_cost.py --kind "GET queue" --profile). The answers are the
    # same: a bad agent id is the 400 a path pattern mismatch gives, and the last
    # of a repeated query key wins, as FastAPI reads it.
    agent_id = request.path_params["agent_id"]
    if not _AGENT_ID.fullmatch(agent_id):
        raise InvalidIdError(
            "agent_id", "agent_id must match [A-Za-z0-9._:@+-]{1,128} (no '/', '?' or '#')"
        )
    project = project_of(request)
    ctx: ApiContext = request.app.state.ctx
    query = request.query_params
    status = query.get("status")
    user_id = query.get("user_id")
    limit = query.get("limit")
    seen = query.get("seen")
    read = query.get("read")
    archived = query.get("archived")
    include = query.get("include")
    count = parse_limit(limit, default=50, maximum=500)
    check_id(user_id, "user_id")
    wanted = status or "pending"
    if wanted not in QUEUE_STATUSES and wanted != ALL_STATUSES:
        allowed = ", ".join((*QUEUE_STATUSES, ALL_STATUSES))
        raise InvalidRequestError("status", f"status must be one of {allowed}")
    if include not in (None, "", INCLUDE_INBOX):
        raise InvalidRequestError("include", f"include must be {INCLUDE_INBOX}")
    inbox = InboxFilter(_flag(seen, "seen"), _flag(read, "read"), _flag(archived, "archived"))
    rows = await ctx.store.notifications.list_queue(
        project,
        agent_id,
        status=None if wanted == ALL_STATUSES else wanted,
        user_id=user_id or None,
        limit=count,
        inbox=inbox,
        now=ctx.clock.now(),
    )
    entry = inbox_entry if include == INCLUDE_INBOX else queue_entry
    return JSONResponse({"notifications": [entry(r) for r in rows]})


@router.get(AGENT_PREFIX + "/counts", responses={200: {"model": InboxCountsOut}})
async def inbox_counts(
    agent_id: AgentId, project: ProjectId, ctx: Ctx, user_id: str | None = None
) -> Response:
    """
    Badge counts over the agent's messages (one user's with ``user_id``):
    ``unseen``, ``unread`` and ``pending`` leave archived messages out.
    """
    check_id(user_id, "user_id")
    counts = await ctx.store.notifications.inbox_counts(project, agent_id, user_id=user_id or None)
    return JSONResponse(
        {
            "total": counts.total,
            "unseen": counts.unseen,
            "unread": counts.unread,
            "archived": counts.archived,
            "pending": counts.pending,
        }
    )


@router.post(AGENT_PREFIX + "/inbox", responses={200: {"model": InboxUpdated}})
async def inbox_bulk(body: InboxBulk, agent_id: AgentId, project: ProjectId, ctx: Ctx) -> Response:
    """
    Apply one inbox ``action`` to the listed ``message_ids`` or to every message
    of ``user_id`` (exactly one of them); ``updated`` counts the messages it
    changed. Unknown ids are passed over; repeating the call changes nothing.
    """
    if (body.message_ids is None) == (body.user_id is None):
        raise InvalidRequestError("message_ids", "give exactly one of message_ids and user_id")
    n = await ctx.store.notifications.set_inbox_state(
        project,
        agent_id,
        InboxAction(body.action),
        now=ctx.clock.now(),
        message_ids=body.message_ids,
        user_id=body.user_id,
    )
    return JSONResponse({"updated": n})


async def _set_one(
    ctx: Ctx, project: str, agent_id: str, message_id: str, action: InboxAction
) -> Response:
    await ctx.store.notifications.set_inbox_state(
        project, agent_id, action, now=ctx.clock.now(), message_ids=[message_id]
    )
    row = await ctx.store.notifications.inbox_state(project, agent_id, message_id)
    if row is None:
        raise NotFoundError(
            "message_id",
            f"message_id {message_id!r}: no such notification",
            resource="notification",
        )
    return JSONResponse(inbox_entry(row))


@router.post(AGENT_PREFIX + "/{message_id}/seen", responses={200: {"model": InboxEntryOut}})
async def mark_seen(
    agent_id: AgentId, message_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """Mark a message seen (again keeps the first instant); answers the entry."""
    return await _set_one(ctx, project, agent_id, message_id, InboxAction.SEEN)


@router.post(AGENT_PREFIX + "/{message_id}/read", responses={200: {"model": InboxEntryOut}})
async def mark_read(
    agent_id: AgentId, message_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """Mark a message read, and seen if it was not; answers the entry."""
    return await _set_one(ctx, project, agent_id, message_id, InboxAction.READ)


@router.post(AGENT_PREFIX + "/{message_id}/unread", responses={200: {"model": InboxEntryOut}})
async def mark_unread(
    agent_id: AgentId, message_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """Clear a message's read instant (it stays seen); answers the entry."""
    return await _set_one(ctx, project, agent_id, message_id, InboxAction.UNREAD)


@router.post(AGENT_PREFIX + "/{message_id}/archive", responses={200: {"model": InboxEntryOut}})
async def archive(
    agent_id: AgentId, message_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """Archive a message (kept, out of the inbox view and the badge); answers the entry."""
    return await _set_one(ctx, project, agent_id, message_id, InboxAction.ARCHIVE)


@router.post(AGENT_PREFIX + "/{message_id}/unarchive", responses={200: {"model": InboxEntryOut}})
async def unarchive(
    agent_id: AgentId, message_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """Bring an archived message back to the inbox; answers the entry."""
    return await _set_one(ctx, project, agent_id, message_id, InboxAction.UNARCHIVE)


NEXT_CURSOR = "X-Next-Cursor"
"""History's next-page cursor header (the SDK's response model forbids extra body keys)."""


def _history_cursor(row: RowMapping) -> str:
    key = f"{row['created_at'].astimezone(UTC).isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def _parse_history_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor stands for; anything else is a 400 naming ``cursor``."""
    try:
        if len(cursor) > 256 or not cursor.isascii():
            raise ValueError(cursor)
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, sep, message_id = raw.partition("|")
        instant = datetime.fromisoformat(at)
        if not sep or not message_id or instant.tzinfo is None:
            raise ValueError(raw)
    except ValueError as exc:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise InvalidRequestError(
            "cursor", f"cursor must be the {NEXT_CURSOR} value of a previous page"
        ) from exc
    return instant, message_id


@router.get(AGENT_PREFIX + "/history", responses={200: {"model": NotificationList}})
async def notification_history(
    request: Request,
    agent_id: AgentId,
    project: ProjectId,
    ctx: Ctx,
    limit: str | None = None,
    cursor: str | None = None,
) -> Response:
    """
    Every notification of the agent across users and statuses, newest first;
    ``limit`` 1..500. When more remain, the ``X-Next-Cursor`` header (and a
    ``Link: <...>; rel="next"``) carries the ``cursor`` of the next page.
    """
    count = parse_limit(limit, default=50, maximum=500)
    before = _parse_history_cursor(cursor) if cursor else None
    rows = await ctx.store.notifications.notification_history(
        project, agent_id, limit=count + 1, before=before
    )
    response = JSONResponse({"notifications": [queue_entry(r) for r in rows[:count]]})
    if len(rows) > count:
        token = _history_cursor(rows[count - 1])
        following = request.url.include_query_params(cursor=token, limit=count)
        response.headers[NEXT_CURSOR] = token
        response.headers["Link"] = f'<{following}>; rel="next"'
    return response


@router.post(AGENT_PREFIX + "/{message_id}/consume", responses={200: {"model": Success}})
async def consume(
    agent_id: AgentId, message_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Mark a message consumed; again is ``{"success": true}`` (retry-safe);
    unknown is 404; an expired or failed message is 409.
    """
    outcome = await ctx.store.notifications.consume_notification(
        project, agent_id, message_id, ctx.clock.now()
    )
    if outcome is ConsumeOutcome.NOT_FOUND:
        raise NotFoundError(
            "message_id",
            f"message_id {message_id!r}: no such notification",
            resource="notification",
        )
    if outcome is ConsumeOutcome.NOT_PENDING:
        raise InvalidStateError(
            "message_id",
            f"message_id {message_id!r}: expired or failed messages cannot be consumed",
        )
    return JSONResponse({"success": True})


@router.get(PROJECT_PREFIX, responses={200: {"model": ProjectNotificationList}})
async def list_project_notifications(
    project: PathProject,
    ctx: Ctx,
    agent_id: str | None = None,
    event_type: str | None = None,
    status: str | None = None,
    limit: str | None = None,
) -> Response:
    """
    The project's notifications, oldest first: ``status`` ``pending`` (default,
    not yet acknowledged), ``acknowledged`` or ``all``; ``limit`` 1..500.
    """
    count = parse_limit(limit, default=50, maximum=500)
    check_id(agent_id, "agent_id")
    wanted = status or "pending"
    if wanted not in ACK_STATUSES:
        raise InvalidRequestError("status", f"status must be one of {', '.join(ACK_STATUSES)}")
    rows = await ctx.store.notifications.list_project_notifications(
        project,
        agent_id=agent_id or None,
        event_type=check_label(event_type, "event_type") or None,
        ack_status=None if wanted == "all" else wanted,
        limit=count,
    )
    entries = []
    for r in rows:
        entry: dict[str, Any] = {
            "notification_id": r["id"],
            "project_id": r["project_id"],
            "event_type": r["event_type"],
            "status": r["ack_status"],
            "payload": json.loads(r["payload_json"]),
            "created_at": wire_time(r["created_at"]),
            "agent_id": r["agent_id"],
            "user_id": r["user_id"],
        }
        if r["acknowledged_at"] is not None:
            entry["acknowledged_at"] = wire_time(r["acknowledged_at"])
        entries.append(entry)
    return JSONResponse({"notifications": entries, "count": len(entries)})


@router.post(PROJECT_PREFIX + "/acknowledge", responses={200: {"model": Acknowledged}})
async def acknowledge(body: AcknowledgeBody, project: PathProject, ctx: Ctx) -> Response:
    """Acknowledge the listed notifications; the count covers only those that changed."""
    for i, nid in enumerate(body.notification_ids):
        check_id(nid, f"notification_ids.{i}")
    n = await ctx.store.notifications.acknowledge(project, body.notification_ids, ctx.clock.now())
    return JSONResponse({"acknowledged": n})


@router.post(PROJECT_PREFIX + "/acknowledge-all", responses={200: {"model": Acknowledged}})
async def acknowledge_all(
    project: PathProject,
    ctx: Ctx,
    agent_id: str | None = None,
    event_type: str | None = None,
) -> Response:
    """Acknowledge every pending notification matching the filters (no body is read)."""
    check_id(agent_id, "agent_id")
    n = await ctx.store.notifications.acknowledge_all(
        project,
        agent_id=agent_id or None,
        event_type=check_label(event_type, "event_type") or None,
        now=ctx.clock.now(),
    )
    return JSONResponse({"acknowledged": n})
