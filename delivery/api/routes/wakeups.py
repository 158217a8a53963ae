"""
One-off wakeups under ``/api/v1/agents/{agentId}/wakeups``.

pending -> executed (by the daemon) | cancelled (by ``DELETE``); both final.
"""

import re
from datetime import timedelta
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
    check_id,
    create_on_pair_clock,
    opt_time,
    parse_limit,
    wire_time,
)
from delivery.api.idempotency import write_recorded_answer
from delivery.api.metrics import bind_ids
from delivery.api.routes.inventory import missing_item
from delivery.api.routes.policy import source_policy_json
from delivery.api.schemas import WakeupCancelled, WakeupCreate, WakeupCreated, WakeupList, WakeupOut
from delivery.cadence import parse_instant
from delivery.domain import notification_id
from delivery.errors import (
    InvalidRequestError,
    InvalidStateError,
    ScheduledAtInPastError,
)
from delivery.store.advance import Pair
from delivery.store.common import new_id
from delivery.store.creates import ExpectedOffset
from delivery.store.idempotency import Recorded
from delivery.store.tables import WakeupRow
from delivery.store.wakeups import CancelOutcome

router = APIRouter(tags=["wakeups"])
PREFIX = "/api/v1/agents/{agent_id}/wakeups"
SELF_RECORDING = re.compile(r"POST /api/v1/agents/[^/]+/wakeups")
"""The route that records its ``Idempotency-Key`` answer with its write."""
STATUSES = ("pending", "executed", "cancelled")
ALL = "all"
"""The ``status`` filter value that lists every wakeup; without a filter only pending ones."""


def wakeup_out(row: WakeupRow) -> WakeupOut:
    """The wire wakeup entry; absent optionals are omitted."""
    return WakeupOut(
        wakeup_id=row.id,
        agent_id=row.agent_id,
        user_id=row.user_id,
        check_type=row.check_type,
        status=row.status,
        scheduled_at=wire_time(row.scheduled_at),
        created_at=wire_time(row.created_at),
        executed_at=opt_time(row.executed_at),
        intent=row.intent or None,
        occasion=row.occasion,
        interest_topic=row.interest_topic,
        event_description=row.event_description,
    )


@body_route.post(router, PREFIX, status_code=201, responses={201: {"model": WakeupCreated}})
async def schedule_wakeup(
    agent_id: AgentId, body: WakeupCreate, project: ProjectId, ctx: Ctx, request: Request
) -> Response:
    """
    Schedule one fire at ``scheduled_at``, else ``now + delay_hours``; ``now`` and
    the past check are on the (agent, user) pair's clock.
    """
    pair = Pair(project, agent_id, body.user_id)
    wakeup_id = new_id("wk")
    item = body.inventory_item_id
    built = await create_on_pair_clock(
        ctx,
        pair,
        build=lambda clock: _new_wakeup(ctx, body, pair, wakeup_id, clock),
        settle=lambda: source_policy_json(body),
        write=lambda new, policy_json, expected: _write_wakeup(
            ctx, request, new, policy_json, expected
        ),
        check=None if item is None else (lambda: _check_wakeup_item(ctx, pair, item)),
    )
    return built[1]


async def _check_wakeup_item(ctx: ApiContext, pair: Pair, item: str) -> None:
    found = await ctx.store.inventory.get_item(pair.project_id, pair.agent_id, pair.user_id, item)
    if found is None:
        raise missing_item(pair.agent_id, pair.user_id, item)


def _new_wakeup(
    ctx: ApiContext, body: WakeupCreate, pair: Pair, wakeup_id: str, clock: PairClock
) -> tuple[dict[str, Any], JSONResponse]:
    """
    The wakeup's row (every column but ``policy_json``, which does not depend on
    the clock and is checked after the inventory item) and the answer, on ``clock``.

    Raises:
        DeliveryError: the body is refused at ``clock``'s now.
    """
    now = clock.now
    if body.scheduled_at is not None:
        scheduled_at = parse_instant(body.scheduled_at, "scheduled_at")
        # The scheduler would skip a schedule's fire this late; a wakeup fires once,
        # so one this late is a client bug (a wrong year, a stale instant) to report.
        max_lateness = timedelta(seconds=ctx.settings.max_lateness_s)
        if scheduled_at < now - max_lateness:
            raise ScheduledAtInPastError(
                "scheduled_at",
                f"scheduled_at {wire_time(scheduled_at)} is more than "
                f"{ctx.settings.max_lateness_s} s in the past; send a future instant "
                "(or delay_hours 0 to fire now)",
            )
    elif body.delay_hours is not None:
        scheduled_at = now + timedelta(hours=body.delay_hours)
    else:
        raise InvalidRequestError("delay_hours", "delay_hours or scheduled_at is required")
    row = {
        "id": wakeup_id,
        "project_id": pair.project_id,
        "agent_id": pair.agent_id,
        "user_id": pair.user_id,
        "check_type": body.check_type,
        "intent": body.intent,
        "occasion": body.occasion,
        "interest_topic": body.interest_topic,
        "event_description": body.event_description,
        "inventory_item_id": body.inventory_item_id,
        "scheduled_at": scheduled_at,
        "due_at": clock.due_at(scheduled_at),
        "status": "pending",
        "executed_at": None,
        "cancelled_at": None,
        "claimed_by": None,
        "claimed_until": None,
        "created_at": now,
    }
    created = WakeupCreated(wakeup_id=wakeup_id, scheduled_at=wire_time(scheduled_at))
    return row, JSONResponse(created.model_dump(), status_code=201)


async def _write_wakeup(
    ctx: ApiContext,
    request: Request,
    built: tuple[dict[str, Any], JSONResponse],
    policy_json: str | None,
    expected: ExpectedOffset | None,
) -> Recorded:
    row = {**built[0], "policy_json": policy_json}
    answer = built[1]
    # Bound once the create is accepted: a refused one never had these ids (and a
    # keyed replay's are replaced by its record's, delivery.api.idempotency).
    wakeup_id = row["id"]
    bind_ids(wakeup_id=wakeup_id, message_id=notification_id(wakeup_id), user_id=row["user_id"])
    # The key's record commits with the row, so the answer is never recorded
    # without its wakeup (nor the wakeup written twice for one key).
    return await write_recorded_answer(
        request,
        answer,
        lambda record: ctx.store.wakeups.insert_wakeup(row, record=record, expected=expected),
    )


@router.get(PREFIX, responses={200: {"model": WakeupList}})
async def list_wakeups(
    agent_id: AgentId,
    project: ProjectId,
    ctx: Ctx,
    user_id: str | None = None,
    status: str | None = None,
    instance_id: str | None = None,
    limit: str | None = None,
) -> Response:
    """
    The agent's pending wakeups, soonest first; ``status`` (pending, executed,
    cancelled, or all) lists others; filter ``user_id``; ``limit`` 1..500.
    """
    del instance_id  # accepted because the SDK sends it; instances are not modelled
    count = parse_limit(limit, default=50, maximum=500)
    check_id(user_id, "user_id")
    if status is not None and status not in (*STATUSES, ALL):
        raise InvalidRequestError("status", f"status must be one of {', '.join((*STATUSES, ALL))}")
    # The SDK's get_wakeups sends no status and means the pending ones (a queue of
    # what is still to come); executed and cancelled ones are asked for by name.
    wanted = None if status == ALL else (status or "pending")
    rows = await ctx.store.wakeups.list_wakeups(
        project, agent_id, user_id=user_id or None, status=wanted, limit=count
    )
    body = WakeupList(wakeups=[wakeup_out(r) for r in rows])
    return JSONResponse(body.model_dump(exclude_none=True))


@router.delete(
    PREFIX + "/{wakeup_id}",
    responses={200: {"model": WakeupCancelled}, 204: {"description": "No such wakeup"}},
)
async def cancel_wakeup(
    agent_id: AgentId, wakeup_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Cancel a pending wakeup. Idempotent: cancelling it again answers the same, an
    unknown id is 204; 409 ``INVALID_STATE`` once it has fired (or is firing).
    """
    outcome = await ctx.store.wakeups.cancel_wakeup(project, agent_id, wakeup_id, ctx.clock.now())
    if outcome is CancelOutcome.NOT_FOUND:
        # As every DELETE here: a retry after a lost answer must not turn into an error.
        return Response(status_code=204)
    if outcome is CancelOutcome.NOT_PENDING:
        raise InvalidStateError(
            "wakeup_id",
            f"wakeup_id {wakeup_id!r}: the wakeup has already fired; it cannot be cancelled",
        )
    return JSONResponse(WakeupCancelled(wakeup_id=wakeup_id, status="cancelled").model_dump())
