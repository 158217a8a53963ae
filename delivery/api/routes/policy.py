"""
Delivery policy: ``/api/v1/policy`` (the key's project) and
``/api/v1/projects/{projectId}/policy`` (another project's id is 404).

``GET`` answers the project's policy (every rule ``null``, i.e. off, until a
``PUT``); ``PUT`` replaces it whole. A user's quiet hours live under
``…/policy/users/{userId}/quiet_hours`` (``GET``, ``PUT``, ``DELETE``): a window in
the user's zone that applies to every source of every agent of the project. The
dispatcher applies a change within ``DELIVERY_TEMPLATE_CACHE_S`` seconds (it keeps a
project's policy that long, as it keeps its templates). The rules are described in
:mod:`delivery.policy`.
"""

import json
import zoneinfo
from collections.abc import Iterable
from functools import lru_cache
from typing import Annotated

import structlog
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import Field
from sqlalchemy.engine import RowMapping

from delivery.api.auth import PathProject, ProjectId
from delivery.api.context import ApiContext, Ctx, UserId
from delivery.api.schemas import (
    FreshnessFields,
    OutsideWindow,
    RequestModel,
    ResponseModel,
    Success,
    WindowFields,
)
from delivery.cadence import parse_instant
from delivery.errors import InvalidRequestError, InvalidTimezoneError, NotFoundError
from delivery.policy import (
    AttentionBudget,
    Priority,
    ProjectPolicy,
    SourcePolicy,
    project_policy,
    source_policy,
)

router = APIRouter(tags=["policy"])
TENANT = "/api/v1/policy"
PROJECT = "/api/v1/projects/{project_id}/policy"
QUIET = "/users/{user_id}/quiet_hours"

_log = structlog.get_logger(__name__)

ClockTime = Annotated[str, Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]


class BudgetBody(RequestModel):
    """At most ``limit`` proactive messages per user in any ``window_seconds``."""

    limit: Annotated[int, Field(ge=0, le=10_000)]
    window_seconds: Annotated[int, Field(ge=60, le=31 * 86_400)]


class PolicyBody(RequestModel):
    """
    ``PUT …/policy``: the whole policy (absent or ``null``: that rule is off).

    ``attention_budget`` caps messages per user across every source;
    ``outside_window`` is what a source that says nothing does inside a user's
    quiet hours (``skip`` by default).
    """

    attention_budget: BudgetBody | None = None
    outside_window: OutsideWindow | None = None


class BudgetOut(ResponseModel):
    limit: int
    window_seconds: int


class PolicyOut(ResponseModel):
    attention_budget: BudgetOut | None = None
    outside_window: str | None = None


class QuietHoursBody(RequestModel):
    """``PUT …/quiet_hours``: ``[start, end)`` on the user's wall clock in ``timezone``."""

    timezone: Annotated[str, Field(min_length=1, max_length=64)]
    start: ClockTime
    end: ClockTime


class QuietHoursOut(ResponseModel):
    user_id: str
    timezone: str
    start: str
    end: str


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _minute(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


POLICY_FIELDS = frozenset(WindowFields.model_fields) - frozenset(RequestModel.model_fields)
"""The delivery-policy fields of a create or update body."""


def patched_policy_json(
    stored: str | None, body: FreshnessFields, given: Iterable[str]
) -> str | None:
    """
    A source's stored policy after an update that sets the ``given`` policy fields of
    ``body`` (``None`` clears one; the others keep their stored value).

    Raises:
        InvalidRequestError: ``expires_at`` is not an instant with an offset.
    """
    fields = set(given)
    old = source_policy(stored)
    expires = old.expires_at
    if "expires_at" in fields:
        expires = None if body.expires_at is None else parse_instant(body.expires_at, "expires_at")
    return SourcePolicy(
        priority=(body.priority or Priority.NORMAL.value) if "priority" in fields else old.priority,
        outside_window=getattr(body, "outside_window", None)
        if "outside_window" in fields
        else old.outside_window,
        ttl_seconds=body.ttl_seconds if "ttl_seconds" in fields else old.ttl_seconds,
        expires_at=expires,
        supersede_key=body.supersede_key if "supersede_key" in fields else old.supersede_key,
    ).stored()


def source_policy_json(body: FreshnessFields) -> str | None:
    """
    The stored policy of a source from its create body (``None``: nothing set).

    Raises:
        InvalidRequestError: ``expires_at`` is not an instant with an offset.
    """
    expires = None if body.expires_at is None else parse_instant(body.expires_at, "expires_at")
    return SourcePolicy(
        priority=body.priority or Priority.NORMAL.value,
        # Not getattr(body, ..., None): on a body without the field (an event)
        # pydantic's __getattr__ builds and raises an AttributeError, a tenth of
        # the trigger-event route's own CPU.
        outside_window=body.outside_window if isinstance(body, WindowFields) else None,
        ttl_seconds=body.ttl_seconds,
        expires_at=expires,
        supersede_key=body.supersede_key,
    ).stored()


async def _get(ctx: ApiContext, project: str) -> Response:
    policy = project_policy(await ctx.store.policy.get_policy(project))
    return JSONResponse(policy.to_json())


async def _put(ctx: ApiContext, project: str, body: PolicyBody) -> Response:
    budget = body.attention_budget
    policy = ProjectPolicy(
        attention_budget=None
        if budget is None
        else AttentionBudget(budget.limit, budget.window_seconds),
        outside_window=body.outside_window,
    )
    stored = policy.to_json()
    text = json.dumps(stored, sort_keys=True, separators=(",", ":"))
    await ctx.store.policy.put_policy(project, text, ctx.clock.now())
    _log.info("policy.updated", project_id=project, **{k: v for k, v in stored.items() if v})
    return JSONResponse(stored)


def _quiet_out(user_id: str, row: RowMapping) -> dict[str, str]:
    return {
        "user_id": user_id,
        "timezone": row["timezone"],
        "start": _clock(row["start_minute"]),
        "end": _clock(row["end_minute"]),
    }


async def _get_quiet(ctx: ApiContext, project: str, user_id: str) -> Response:
    row = await ctx.store.policy.get_quiet_hours(project, user_id)
    if row is None:
        raise NotFoundError(
            "user_id", f"user_id {user_id!r} has no quiet hours", resource="quiet_hours"
        )
    return JSONResponse(_quiet_out(user_id, row))


async def _put_quiet(ctx: ApiContext, project: str, user_id: str, body: QuietHoursBody) -> Response:
    if body.timezone not in _zone_names():
        raise InvalidTimezoneError(
            "timezone",
            f"timezone {body.timezone[:64]!r} is not an IANA zone name "
            "(names are case-sensitive, e.g. 'America/New_York')",
        )
    start, end = _minute(body.start), _minute(body.end)
    if start == end:
        raise InvalidRequestError(
            "end", "end equals start: the quiet hours would be empty (DELETE them instead)"
        )
    await ctx.store.policy.put_quiet_hours(
        project, user_id, timezone=body.timezone, start=start, end=end, now=ctx.clock.now()
    )
    _log.info("policy.quiet_hours_set", project_id=project, user_id=user_id)
    return JSONResponse(
        {"user_id": user_id, "timezone": body.timezone, "start": body.start, "end": body.end}
    )


async def _delete_quiet(ctx: ApiContext, project: str, user_id: str) -> Response:
    if not await ctx.store.policy.delete_quiet_hours(project, user_id):
        # As every DELETE here: a retry after a lost answer must not turn into an error.
        return Response(status_code=204)
    _log.info("policy.quiet_hours_deleted", project_id=project, user_id=user_id)
    return JSONResponse({"success": True})


# --- tenant-scoped: the key's project ---------------------------------------------------


@router.get(TENANT, responses={200: {"model": PolicyOut}})
async def get_policy(project: ProjectId, ctx: Ctx) -> Response:
    """The project's delivery policy (every rule ``null`` until set)."""
    return await _get(ctx, project)


@router.put(TENANT, responses={200: {"model": PolicyOut}})
async def put_policy(body: PolicyBody, project: ProjectId, ctx: Ctx) -> Response:
    """Replace the project's delivery policy whole."""
    return await _put(ctx, project, body)


@router.get(TENANT + QUIET, responses={200: {"model": QuietHoursOut}})
async def get_quiet_hours(user_id: UserId, project: ProjectId, ctx: Ctx) -> Response:
    """The user's quiet hours; 404 when none are set."""
    return await _get_quiet(ctx, project, user_id)


@router.put(TENANT + QUIET, responses={200: {"model": QuietHoursOut}})
async def put_quiet_hours(
    user_id: UserId, body: QuietHoursBody, project: ProjectId, ctx: Ctx
) -> Response:
    """Set the user's quiet hours (every source of every agent keeps them)."""
    return await _put_quiet(ctx, project, user_id, body)


@router.delete(
    TENANT + QUIET,
    responses={200: {"model": Success}, 204: {"description": "No quiet hours were set"}},
)
async def delete_quiet_hours(user_id: UserId, project: ProjectId, ctx: Ctx) -> Response:
    """Remove the user's quiet hours; 204 when there were none."""
    return await _delete_quiet(ctx, project, user_id)


# --- project-scoped ---------------------------------------------------------------------


@router.get(PROJECT, responses={200: {"model": PolicyOut}})
async def get_project_policy(project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped get, for ``project_id``."""
    return await _get(ctx, project)


@router.put(PROJECT, responses={200: {"model": PolicyOut}})
async def put_project_policy(body: PolicyBody, project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped put, for ``project_id``."""
    return await _put(ctx, project, body)


@router.get(PROJECT + QUIET, responses={200: {"model": QuietHoursOut}})
async def get_project_quiet_hours(user_id: UserId, project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped get, for ``project_id``."""
    return await _get_quiet(ctx, project, user_id)


@router.put(PROJECT + QUIET, responses={200: {"model": QuietHoursOut}})
async def put_project_quiet_hours(
    user_id: UserId, body: QuietHoursBody, project: PathProject, ctx: Ctx
) -> Response:
    """As the tenant-scoped put, for ``project_id``."""
    return await _put_quiet(ctx, project, user_id, body)


@router.delete(
    PROJECT + QUIET,
    responses={200: {"model": Success}, 204: {"description": "No quiet hours were set"}},
)
async def delete_project_quiet_hours(user_id: UserId, project: PathProject, ctx: Ctx) -> Response:
    """As the tenant-scoped delete, for ``project_id``."""
    return await _delete_quiet(ctx, project, user_id)
