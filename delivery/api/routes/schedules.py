"""
Schedules under ``/api/v1/agents/{agentId}/users/{userId}/schedules``.

Every write validates completely through the cadence engine before it opens a
transaction, stores the canonical JSON of the normalised cadence / window /
metadata (so reads echo what was stored) and computes ``next_fire_at`` from the clock.
"""

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from delivery.api import bodyroute as body_route
from delivery.api.auth import ProjectId
from delivery.api.context import (
    AgentId,
    ApiContext,
    Ctx,
    PairClock,
    ResourceId,
    UserId,
    check_metadata,
    create_on_pair_clock,
    loads,
    opt_time,
    pair_clock,
    parse_limit,
    wire_time,
)
from delivery.api.idempotency import write_recorded_answer
from delivery.api.metrics import bind_ids
from delivery.api.routes.inventory import missing_item
from delivery.api.routes.policy import POLICY_FIELDS, patched_policy_json, source_policy_json
from delivery.api.schemas import (
    ScheduleCreate,
    ScheduleCreated,
    ScheduleList,
    ScheduleOut,
    SchedulePatch,
    Success,
    Upcoming,
)
from delivery.cadence import (
    compile_schedule,
    format_local,
    next_fire,
    parse_instant,
    upcoming,
)
from delivery.cadence.model import CompiledSchedule
from delivery.errors import (
    ConflictError,
    InvalidActiveWindowError,
    InvalidCadenceError,
    InvalidWindowError,
    NotFoundError,
)
from delivery.planning import Skip, ticks_behind_clock
from delivery.store.advance import Pair
from delivery.store.common import canonical_json, new_id
from delivery.store.creates import ExpectedOffset
from delivery.store.idempotency import Recorded
from delivery.store.schedules import compile_stored, defers
from delivery.store.tables import ScheduleRow

router = APIRouter(tags=["schedules"])
PREFIX = "/api/v1/agents/{agent_id}/users/{user_id}/schedules"
SELF_RECORDING = re.compile(r"POST /api/v1/agents/[^/]+/users/[^/]+/schedules")
"""The route that records its ``Idempotency-Key`` answer with its write."""
_PATCH_ATTEMPTS = 5
_MICROSECOND = timedelta(microseconds=1)


def _not_found(schedule_id: str) -> NotFoundError:
    return NotFoundError(
        "schedule_id", f"schedule_id {schedule_id!r}: no such schedule", resource="schedule"
    )


def effectively_enabled(row: ScheduleRow, now: datetime) -> bool:
    """
    Whether the schedule still fires, as the wire shows it.

    Enabled and not past ``ends_at`` (the soft-disable is visible before the daemon
    flips it). The scheduler stages a fire up to its lookahead early and, when
    ``ends_at`` leaves nothing after that fire, writes ``enabled=false`` in the same
    pass: until the staged fire's instant the schedule is still enabled. A client
    disable drops the staged fire (``staged_fire_at`` cleared), so a staged fire
    ahead always means the scheduler did it.
    """
    if row.staged_fire_at is not None and row.staged_fire_at > now:
        return True
    return row.enabled and (row.ends_at is None or row.ends_at > now)


def schedule_out(row: ScheduleRow, now: datetime) -> ScheduleOut:
    """
    The wire schedule object; ``next_fire_at`` is ``""`` when nothing is next.

    A fire the scheduler already staged (lookahead) is still the next one until
    its instant: the row's ``next_fire_at`` has moved past it.
    """
    enabled = effectively_enabled(row, now)
    upcoming = row.next_fire_at
    if row.staged_fire_at is not None and row.staged_fire_at > now:
        upcoming = row.staged_fire_at
    return ScheduleOut(
        schedule_id=row.id,
        cadence_type=row.cadence_type,
        cadence=row.cadence_json,
        timezone=row.timezone,
        next_fire_at=wire_time(upcoming) if enabled else "",
        intent=row.intent,
        check_type=row.check_type,
        enabled=enabled,
        created_at=wire_time(row.created_at),
        updated_at=wire_time(row.updated_at),
        active_window=row.active_window_json,
        metadata=row.metadata_json,
        inventory_item_id=row.inventory_item_id,
        starts_at=opt_time(row.starts_at),
        ends_at=opt_time(row.ends_at),
    )


def _json(model: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json", exclude_none=True), status_code=status)


async def _check_item(ctx: ApiContext, project: str, agent: str, user: str, item: str) -> None:
    if await ctx.store.inventory.get_item(project, agent, user, item) is None:
        raise missing_item(agent, user, item)


def _first_fire(
    compiled: CompiledSchedule,
    cadence: Any,
    window: Any,
    *,
    starts_at: datetime | None,
    created_at: datetime,
    now: datetime,
) -> datetime:
    """
    The schedule's next fire after ``now``; a schedule that can never fire again is
    refused, as an empty ``days_of_week`` is, naming the field that rules it out.

    The cadence engine's search is bounded (400 years of wall-clock days, two years
    of ``interval_hours`` steps), so "no next fire" is a finite verdict.
    """
    fire = next_fire(compiled, now)
    if fire is not None:
        return fire
    unbounded = compiled
    if compiled.ends_at is not None:
        # Rebuilt only on this error path: does the window alone rule out every fire?
        unbounded = compile_schedule(cadence, window, starts_at=starts_at, created_at=created_at)
    if compiled.ends_at is None or next_fire(unbounded, now) is None:
        if compiled.active_window is not None:
            raise InvalidActiveWindowError(
                "active_window",
                "active_window leaves no fire: every tick of the cadence falls outside it "
                "(widen active_window.hours or active_window.days_of_week, or move "
                "cadence times inside it)",
            )
        raise InvalidCadenceError("cadence", "cadence has no fire after now")
    raise InvalidWindowError(
        "ends_at",
        f"ends_at {wire_time(compiled.ends_at)} leaves no fire: the cadence's next tick is "
        "at or after it",
    )


def _deferred_first_fire(
    first: datetime,
    cadence: Any,
    *,
    starts_at: datetime | None,
    ends_at: datetime | None,
    created_at: datetime,
    now: datetime,
) -> datetime:
    """
    A deferring schedule's next fire: its cadence's next tick, window or not (the
    dispatcher defers one outside the window to its opening); ``first`` (the
    windowed one, already checked) when the cadence alone has none.
    """
    windowless = compile_schedule(
        cadence, None, starts_at=starts_at, ends_at=ends_at, created_at=created_at
    )
    return next_fire(windowless, now) or first


async def _get(ctx: ApiContext, project: str, agent: str, user: str, sid: str) -> ScheduleRow:
    row = await ctx.store.schedules.get_schedule(project, agent, user, sid)
    if row is None:
        raise _not_found(sid)
    return row


@router.get(PREFIX, responses={200: {"model": ScheduleList}})
async def list_schedules(
    agent_id: AgentId, user_id: UserId, project: ProjectId, ctx: Ctx
) -> Response:
    """Every schedule of the (agent, user) pair."""
    now = (await pair_clock(ctx, project, agent_id, user_id)).now
    rows = await ctx.store.schedules.list_schedules(project, agent_id, user_id)
    return _json(ScheduleList(schedules=[schedule_out(r, now) for r in rows]))


@body_route.post(router, PREFIX, status_code=201, responses={201: {"model": ScheduleCreated}})
async def create_schedule(
    agent_id: AgentId,
    user_id: UserId,
    body: ScheduleCreate,
    project: ProjectId,
    ctx: Ctx,
    request: Request,
) -> Response:
    """
    Create a schedule; ``next_fire_at`` is the first fire after the pair's now.

    On an advanced pair the schedule is created at the pair's now (its anchor);
    the cadence's ticks between real now and then are recorded as skipped
    (``before_pair_clock``): never due, but visible in the timeline.
    """
    pair = Pair(project, agent_id, user_id)
    schedule_id = new_id("sch")
    item = body.inventory_item_id
    built = await create_on_pair_clock(
        ctx,
        pair,
        build=lambda clock: _new_schedule(body, pair, schedule_id, clock),
        settle=lambda: source_policy_json(body),
        write=lambda new, policy_json, expected: _write_schedule(
            ctx, request, new, policy_json, expected
        ),
        check=None
        if item is None
        else (lambda: _check_item(ctx, project, agent_id, user_id, item)),
    )
    return built.answer


@dataclass(frozen=True, slots=True)
class _NewSchedule:
    row: dict[str, Any]
    skips: list[Skip]
    answer: JSONResponse


def _new_schedule(
    body: ScheduleCreate, pair: Pair, schedule_id: str, clock: PairClock
) -> _NewSchedule:
    """
    The schedule's row (every column but ``policy_json``, which does not depend
    on the clock and is checked after the inventory item), the ticks its pair's
    clock has passed, and the answer, on ``clock``.

    Raises:
        DeliveryError: the body is refused at ``clock``'s now.
    """
    now = clock.now
    starts_at = None if body.starts_at is None else parse_instant(body.starts_at, "starts_at")
    ends_at = None if body.ends_at is None else parse_instant(body.ends_at, "ends_at")
    compiled = compile_schedule(
        body.cadence,
        body.active_window,
        starts_at=starts_at,
        ends_at=ends_at,
        created_at=now,
        now=now,
    )
    upcoming_fire = _first_fire(
        compiled,
        body.cadence,
        body.active_window,
        starts_at=starts_at,
        created_at=now,
        now=now,
    )
    if body.outside_window == "defer" and compiled.active_window is not None:
        upcoming_fire = _deferred_first_fire(
            upcoming_fire,
            body.cadence,
            starts_at=starts_at,
            ends_at=ends_at,
            created_at=now,
            now=now,
        )
    metadata_json = check_metadata(body.metadata)
    row = {
        "id": schedule_id,
        "project_id": pair.project_id,
        "agent_id": pair.agent_id,
        "user_id": pair.user_id,
        "cadence_type": compiled.cadence_type,
        "cadence_json": canonical_json(compiled.cadence),
        "timezone": compiled.timezone,
        "active_window_json": (
            None if compiled.active_window is None else canonical_json(compiled.active_window)
        ),
        "intent": body.intent,
        "check_type": body.check_type,
        "inventory_item_id": body.inventory_item_id,
        "metadata_json": metadata_json,
        "starts_at": compiled.starts_at,
        "ends_at": compiled.ends_at,
        "anchor_at": compiled.anchor,
        "enabled": True,
        "next_fire_at": upcoming_fire,
        "due_at": clock.due_at(upcoming_fire),
        "last_fire_at": None,
        "staged_fire_at": None,
        "claimed_by": None,
        "claimed_until": None,
        "version": 1,
        "created_at": now,
        "updated_at": now,
    }
    skips = ticks_behind_clock(compiled, real_now=clock.real, pair_now=now)
    answer = _json(
        ScheduleCreated(
            schedule_id=schedule_id,
            next_fire_at=wire_time(upcoming_fire),
            next_fire_at_local=format_local(upcoming_fire, compiled.zone),
            enabled=True,
        ),
        201,
    )
    return _NewSchedule(row, skips, answer)


async def _write_schedule(
    ctx: ApiContext,
    request: Request,
    built: _NewSchedule,
    policy_json: str | None,
    expected: ExpectedOffset | None,
) -> Recorded:
    row = {**built.row, "policy_json": policy_json}
    # Bound once the create is accepted: a refused one never had this id (and a
    # keyed replay's is replaced by its record's, delivery.api.idempotency).
    bind_ids(schedule_id=row["id"])
    # The key's record commits with the schedule (see wakeups.py).
    return await write_recorded_answer(
        request,
        built.answer,
        lambda record: ctx.store.schedules.insert_schedule(
            row, built.skips, record=record, expected=expected
        ),
    )


@router.get(PREFIX + "/{schedule_id}", responses={200: {"model": ScheduleOut}})
async def get_schedule(
    agent_id: AgentId, user_id: UserId, schedule_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """One schedule."""
    row = await _get(ctx, project, agent_id, user_id, schedule_id)
    return _json(schedule_out(row, (await pair_clock(ctx, project, agent_id, user_id)).now))


_TIMING = frozenset({"cadence", "active_window", "starts_at", "ends_at", "enabled"})


def _patched(
    row: ScheduleRow, body: SchedulePatch, given: set[str], now: datetime
) -> tuple[dict[str, Any], bool]:
    """
    The column changes a PATCH makes to ``row`` (pure; raises on invalid input).

    ``given`` holds the fields the body sets: the others' non-null ones, and the
    delivery-policy ones even when null (null clears those).

    Returns:
        The changes and whether timing changed (so the daemon should look again).
    """
    policy_json = row.policy_json
    if given & POLICY_FIELDS:
        policy_json = patched_policy_json(row.policy_json, body, given & POLICY_FIELDS)
    # Skip or defer decides which ticks fire (a deferring schedule fires the ones
    # outside its active window too): a change of it is a change of timing.
    defer = defers({"policy_json": policy_json})
    cadence = body.cadence if "cadence" in given else json.loads(row.cadence_json)
    window = (
        (body.active_window or None) if "active_window" in given else loads(row.active_window_json)
    )
    starts_at = row.starts_at
    if "starts_at" in given:
        starts_at = parse_instant(body.starts_at, "starts_at") if body.starts_at else None
    ends_at = row.ends_at
    if "ends_at" in given:
        ends_at = parse_instant(body.ends_at, "ends_at") if body.ends_at else None
    # The base is what the client saw: a schedule whose last fire is staged but not
    # yet due reads enabled and stays so when, say, only its ends_at moves.
    enabled = body.enabled if body.enabled is not None else effectively_enabled(row, now)
    # An ends_at in the past is an error when the client sets it, or re-enables a
    # schedule that is past it; otherwise an expired schedule
    # may still be edited (e.g. its intent) and stays disabled.
    check_now = now if (("ends_at" in given and ends_at) or body.enabled is True) else None
    compiled = compile_schedule(
        cadence,
        window,
        starts_at=starts_at,
        ends_at=ends_at,
        created_at=row.created_at,
        now=check_now,
    )
    changes: dict[str, Any] = {
        "cadence_type": compiled.cadence_type,
        "cadence_json": canonical_json(compiled.cadence),
        "timezone": compiled.timezone,
        "active_window_json": (
            None if compiled.active_window is None else canonical_json(compiled.active_window)
        ),
        "starts_at": compiled.starts_at,
        "ends_at": compiled.ends_at,
        "anchor_at": compiled.anchor,
        "enabled": enabled,
        "version": row.version + 1,
        "updated_at": now,
    }
    if "intent" in given:
        changes["intent"] = body.intent
    if "check_type" in given:
        changes["check_type"] = body.check_type
    if "metadata" in given:
        changes["metadata_json"] = check_metadata(body.metadata)
    if "inventory_item_id" in given:
        changes["inventory_item_id"] = body.inventory_item_id or None
    if given & POLICY_FIELDS:
        changes["policy_json"] = policy_json
    timing = bool(given & _TIMING) or (defer != defers(row) and compiled.active_window is not None)
    if timing:
        # Recomputed from now: fires already made are never rewritten. A disabled
        # schedule is not checked: re-enabling it is a timing change checked then.
        first = (
            _first_fire(
                compiled,
                cadence,
                window,
                starts_at=starts_at,
                created_at=row.created_at,
                now=now,
            )
            if enabled
            else None
        )
        if first is not None and compiled.active_window is not None and defer:
            first = _deferred_first_fire(
                first,
                cadence,
                starts_at=starts_at,
                ends_at=ends_at,
                created_at=row.created_at,
                now=now,
            )
        changes["next_fire_at"] = first
        changes["claimed_by"] = None
        changes["claimed_until"] = None
        # A fire staged under the old timing is deleted (SqlStore.update_schedule).
        changes["staged_fire_at"] = None
    return changes, timing


@router.patch(PREFIX + "/{schedule_id}", responses={200: {"model": ScheduleOut}})
async def update_schedule(
    agent_id: AgentId,
    user_id: UserId,
    schedule_id: ResourceId,
    body: SchedulePatch,
    project: ProjectId,
    ctx: Ctx,
) -> Response:
    """Change a schedule; absent fields stay, ``{}`` / ``""`` clear."""
    row, now = await patch_schedule(ctx, project, agent_id, user_id, schedule_id, body)
    return _json(schedule_out(row, now))


async def patch_schedule(
    ctx: ApiContext,
    project: str,
    agent_id: str,
    user_id: str,
    schedule_id: str,
    body: SchedulePatch,
) -> tuple[ScheduleRow, datetime]:
    """
    Apply a PATCH (the API's and the console's enable / disable): the schedule as
    written and the instant of the write. Retried on a concurrent change, then 409.
    """
    given = {
        k
        for k in body.model_fields_set
        if getattr(body, k) is not None or k in POLICY_FIELDS  # null clears a policy field
    }
    for _ in range(_PATCH_ATTEMPTS):
        row = await _get(ctx, project, agent_id, user_id, schedule_id)
        clock = await pair_clock(ctx, project, agent_id, user_id)
        now = clock.now
        if not given:
            return row, now
        changes, timing = _patched(row, body, given, now)
        if timing:
            # Recomputed on the pair's clock; due in real time at its offset.
            changes["due_at"] = clock.due_at(changes["next_fire_at"])
        if changes.get("inventory_item_id"):
            await _check_item(ctx, project, agent_id, user_id, changes["inventory_item_id"])
        if await ctx.store.schedules.update_schedule(
            row, changes, row.version, now=now, drop_staged_after=now if timing else None
        ):
            if timing:
                ctx.wake()
            return row.model_copy(update=changes), now
    raise ConflictError(
        "schedule_id",
        f"schedule_id {schedule_id!r}: the schedule is being changed concurrently; retry",
    )


@router.delete(
    PREFIX + "/{schedule_id}",
    responses={200: {"model": Success}, 204: {"description": "No such schedule"}},
)
async def delete_schedule(
    agent_id: AgentId, user_id: UserId, schedule_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Delete a schedule and its fire history. Idempotent: an unknown id (or another
    tenant's) is 204, as the SDK documents, so tenants still learn nothing.
    """
    if not await ctx.store.schedules.delete_schedule(
        project, agent_id, user_id, schedule_id, now=ctx.clock.now()
    ):
        return Response(status_code=204)
    return _json(Success(success=True))


@router.get(PREFIX + "/{schedule_id}/upcoming", responses={200: {"model": Upcoming}})
async def upcoming_fires(
    agent_id: AgentId,
    user_id: UserId,
    schedule_id: ResourceId,
    project: ProjectId,
    ctx: Ctx,
    limit: str | None = None,
) -> Response:
    """The next ``limit`` (1..1000, default 10) fires after now, active window applied."""
    count = parse_limit(limit, default=10, maximum=1000)
    row = await _get(ctx, project, agent_id, user_id, schedule_id)
    now = (await pair_clock(ctx, project, agent_id, user_id)).now
    if not effectively_enabled(row, now):
        return _json(Upcoming(upcoming=[]))
    # From what get() shows as next: after a clock reset the ticks between real now
    # and it were handled on the pair's simulated clock and will not fire.
    first = row.next_fire_at
    if row.staged_fire_at is not None and row.staged_fire_at > now:
        first = row.staged_fire_at
    after = now if first is None or first <= now else first - _MICROSECOND
    fires = upcoming(compile_stored(row), after, count)
    return _json(Upcoming(upcoming=[wire_time(f) for f in fires]))
