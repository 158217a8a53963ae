"""
The timeline and its explanation, beside the schedules:

* ``GET /api/v1/agents/{agentId}/users/{userId}/timeline``
* ``GET /api/v1/agents/{agentId}/users/{userId}/schedules/{scheduleId}/timeline``
* ``.../timeline/explain?at=&window=`` on both.

Read-only: the store (:mod:`delivery.store.timeline`) reads, the pure
:func:`delivery.explain.explain` decides, this module parses and renders. Each entry
has its UTC instant and its local time in its schedule's zone; an entry without a
schedule uses the user's most recently created schedule's zone, or UTC, and says which.
"""

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from delivery.api.auth import ProjectId
from delivery.api.context import (
    AgentId,
    ApiContext,
    Ctx,
    ResourceId,
    UserId,
    pair_clock,
    parse_limit,
)
from delivery.cadence import EARLIEST, LATEST, format_utc, parse_instant
from delivery.errors import InvalidRequestError, NotFoundError
from delivery.explain import explain, parse_window
from delivery.store.timeline import PageQuery, Scope, SqlTimelineStore, UserZone
from delivery.timeline import (
    Order,
    TimelineEvent,
    decode_cursor,
    encode_cursor,
    local_time,
    to_wire,
)

router = APIRouter(tags=["timeline"])
USER = "/api/v1/agents/{agent_id}/users/{user_id}/timeline"
SCHEDULE = "/api/v1/agents/{agent_id}/users/{user_id}/schedules/{schedule_id}/timeline"
MAX_LIMIT = 500


def parse_order(raw: str | None) -> Order:
    """``asc`` (default, oldest first) or ``desc``."""
    if raw is None or raw == "":
        return Order.ASC
    try:
        return Order(raw)
    except ValueError:
        raise InvalidRequestError("order", f"order must be asc or desc, got {raw!r}") from None


def parse_span(since: str | None, until: str | None) -> tuple[datetime, datetime]:
    """``[since, until)``; either may be absent. Raises 400 when since > until."""
    lo = EARLIEST if not since else parse_instant(since, "since")
    hi = LATEST if not until else parse_instant(until, "until")
    if lo > hi:
        raise InvalidRequestError("since", f"since ({since}) is after until ({until})")
    return lo, hi


def entry(event: TimelineEvent, user_zone: UserZone) -> dict[str, Any]:
    """One wire entry (:func:`delivery.timeline.to_wire`) with the user's default zone."""
    return to_wire(event, user_zone.name, user_zone.source)


def zone_body(zone: UserZone) -> dict[str, Any]:
    """The response's default zone and its source."""
    body: dict[str, Any] = {"name": zone.name, "source": zone.source}
    if zone.schedule_id:
        body["schedule_id"] = zone.schedule_id
    return body


async def _scope(
    ctx: ApiContext, project: str, agent: str, user: str, schedule: str | None
) -> tuple[SqlTimelineStore, Scope]:
    store = ctx.timeline
    scope = Scope(project, agent, user, schedule)
    if schedule is not None and not await store.schedule_known(scope):
        raise NotFoundError(
            "schedule_id", f"schedule_id {schedule!r}: no such schedule", resource="schedule"
        )
    return store, scope


async def _timeline(
    ctx: ApiContext,
    scope_ids: tuple[str, str, str, str | None],
    since: str | None,
    until: str | None,
    cursor: str | None,
    limit: str | None,
    order: str | None,
) -> Response:
    count = parse_limit(limit, default=50, maximum=MAX_LIMIT)
    direction = parse_order(order)
    lo, hi = parse_span(since, until)
    after = decode_cursor(cursor, direction) if cursor else None
    store, scope = await _scope(ctx, *scope_ids)
    # An advanced pair's rows are dated on its clock; "late" is judged on it too.
    now = (await pair_clock(ctx, *scope_ids[:3])).now
    query = PageQuery(
        since=lo,
        until=hi,
        after=after,
        order=direction,
        limit=count,
        now=now,
        max_lateness=timedelta(seconds=ctx.settings.max_lateness_s),
    )
    found = await store.page(scope, query)
    events, zone = found.events, found.zone
    page = events[:count]
    body: dict[str, Any] = {
        "agent_id": scope.agent_id,
        "user_id": scope.user_id,
        "order": direction.value,
        "timezone": zone_body(zone),
        "events": [entry(e, zone) for e in page],
        "has_more": len(events) > count,
    }
    if scope.schedule_id:
        body["schedule_id"] = scope.schedule_id
    if len(events) > count:
        body["next_cursor"] = encode_cursor(page[-1].key, direction)
    return JSONResponse(body)


async def _explain(
    ctx: ApiContext,
    scope_ids: tuple[str, str, str, str | None],
    at: str | None,
    window: str | None,
) -> Response:
    instant = parse_instant(at, "at") if at else None
    span = parse_window(window)
    store, scope = await _scope(ctx, *scope_ids)
    # "Now" for an advanced pair is its own clock: what fired there is in its past.
    now = (await pair_clock(ctx, *scope_ids[:3])).now
    instant = instant or now
    facts = await store.explain_facts(
        scope,
        at=instant,
        window=span,
        now=now,
        max_lateness=timedelta(seconds=ctx.settings.max_lateness_s),
    )
    answer = explain(facts)
    zone = await store.user_zone(scope)
    name = answer.timezone or zone.name
    body = {
        **answer.to_dict(),
        "at": format_utc(instant),
        "local_at": local_time(instant, name),
        "timezone": name,
        "window_s": int(span.total_seconds()),
    }
    return JSONResponse(body)


@router.get(USER)
async def user_timeline(
    agent_id: AgentId,
    user_id: UserId,
    project: ProjectId,
    ctx: Ctx,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
    limit: str | None = None,
    order: str | None = None,
) -> Response:
    """
    Everything that happened for the user, in order: schedule changes, fires and
    skips with their rule, wakeups and trigger events, messages composed, failed and
    consumed, webhook and channel attempts, channel fallbacks, dead letters, disabled
    endpoints. ``limit`` 1..500 (default 50); ``order`` asc (default) or desc; ``next_cursor``
    continues the page.
    """
    return await _timeline(
        ctx, (project, agent_id, user_id, None), since, until, cursor, limit, order
    )


@router.get(SCHEDULE)
async def schedule_timeline(
    agent_id: AgentId,
    user_id: UserId,
    schedule_id: ResourceId,
    project: ProjectId,
    ctx: Ctx,
    since: str | None = None,
    until: str | None = None,
    cursor: str | None = None,
    limit: str | None = None,
    order: str | None = None,
) -> Response:
    """The timeline of one schedule (also after it was deleted); 404 for an unknown id."""
    return await _timeline(
        ctx, (project, agent_id, user_id, schedule_id), since, until, cursor, limit, order
    )


@router.get(USER + "/explain")
async def explain_user(
    agent_id: AgentId,
    user_id: UserId,
    project: ProjectId,
    ctx: Ctx,
    at: str | None = None,
    window: str | None = None,
) -> Response:
    """
    Did the user get a message within ``window`` (default 1h; 90s, 30m, 2h, 1d) of
    ``at`` (default now), and if not, why: a machine ``code`` and a ``sentence``.
    """
    return await _explain(ctx, (project, agent_id, user_id, None), at, window)


@router.get(SCHEDULE + "/explain")
async def explain_schedule(
    agent_id: AgentId,
    user_id: UserId,
    schedule_id: ResourceId,
    project: ProjectId,
    ctx: Ctx,
    at: str | None = None,
    window: str | None = None,
) -> Response:
    """The same answer, for one schedule only."""
    return await _explain(ctx, (project, agent_id, user_id, schedule_id), at, window)
