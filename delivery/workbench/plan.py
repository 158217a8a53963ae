"""
Advance-time's planner: pure. From the pair's state read through the store, the
window, the fires (fired and skipped), the schedules' moves and the drafts.

Deterministic: fire ids are the scheduler's
(:func:`delivery.planning.fire_id`), notification ids derive from them, and every
instant in the plan is a simulated fire instant, so the same state and call give
the same plan.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from delivery.cadence import LATEST, format_utc, next_fire, ticks_between
from delivery.dispatcher.process import inventory_item, schedule_draft, wakeup_draft
from delivery.domain import Draft
from delivery.errors import InvalidRequestError
from delivery.planning import fire_id
from delivery.store.advance import Pair, PairState
from delivery.store.schedules import compile_stored

MAX_SIMULATED_HOURS = 24 * 366
"""One (leap) year per call bounds the work of one request."""
_EPSILON = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Window:
    """The simulated instants an advance covers: ``[start, end)``."""

    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class AdvancePlan:
    """
    What one advance writes besides its notifications (composed from ``drafts``).

    Attributes:
        window: the simulated instants covered.
        old_offset_s: the pair's offset the plan started from (``None``: never advanced).
        fires: ``fires`` rows, fired and skipped, by (``fire_at``, id).
        drafts: the notifications' drafts, by (instant, kind, source id).
        schedule_moves: the schedules whose ``next_fire_at`` falls in the window:
            moved past it (see :class:`delivery.store.advance.AdvanceWrite`).
    """

    window: Window
    old_offset_s: float | None
    fires: list[dict[str, Any]]
    drafts: list[Draft]
    schedule_moves: list[dict[str, Any]]


def validate_hours(value: Any) -> float:
    """
    ``simulated_hours`` as a float in (0, :data:`MAX_SIMULATED_HOURS`].

    Raises:
        InvalidRequestError: not a number, not finite, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError("simulated_hours", "simulated_hours must be a number of hours")
    if not 0 < value <= MAX_SIMULATED_HOURS:
        raise InvalidRequestError(
            "simulated_hours",
            f"simulated_hours must be greater than 0 and at most {MAX_SIMULATED_HOURS}, "
            f"got {value}",
        )
    return float(value)


def advance_window(now: datetime, offset_s: float | None, hours: float) -> Window:
    """
    The pair's next ``hours`` from its clock (real ``now`` plus its offset).

    Raises:
        InvalidRequestError: the window would reach past :data:`~delivery.cadence.LATEST`.
    """
    offset = timedelta(seconds=offset_s or 0.0)
    # Compared as durations: a clock pushed near year 9999 by repeated advances would
    # overflow datetime arithmetic (a 500) before any instant could be checked.
    if offset + timedelta(hours=hours) >= LATEST - now:
        raise InvalidRequestError(
            "simulated_hours",
            f"simulated_hours {hours:g} would move this agent and user's simulated clock "
            f"to or past {format_utc(LATEST)}, the latest instant the service handles",
        )
    start = now + offset
    return Window(start, start + timedelta(hours=hours))


def plan_advance(
    pair: Pair, window: Window, offset_s: float | None, state: PairState
) -> AdvancePlan:
    """
    Every fire of ``window`` for ``pair``, in order, at its simulated instant.

    The schedule ticks in the window (active window and DST rules from the
    cadence engine; a skipped tick is recorded like the scheduler records it),
    and ``state``'s pending wakeups (the store read those in the window).
    """
    start, end = window.start, window.end
    fires: list[dict[str, Any]] = []
    drafts: list[Draft] = []
    moves: list[dict[str, Any]] = []
    for schedule in state.schedules:
        compiled = compile_stored(schedule)
        # ticks_between is (after, until]; shifting both ends by 1 us gives [start, end).
        ticks = ticks_between(compiled, start - _EPSILON, end - _EPSILON)
        item = inventory_item(state.items.get(schedule["inventory_item_id"] or ""), schedule)
        fired_at: datetime | None = None
        for tick in ticks:
            fid = fire_id(schedule["id"], tick.fire_at)
            fires.append(
                {
                    "id": fid,
                    "schedule_id": schedule["id"],
                    "project_id": pair.project_id,
                    "agent_id": pair.agent_id,
                    "user_id": pair.user_id,
                    "fire_at": tick.fire_at,
                    "status": "fired" if tick.skipped is None else "skipped",
                    "skip_reason": None if tick.skipped is None else tick.skipped.value,
                    "created_at": tick.fire_at,
                }
            )
            if tick.skipped is None:
                # The tick after this one is the fire that supersedes a message
                # deferred past it, as the dispatcher reads it from the schedule.
                following = {**schedule, "next_fire_at": next_fire(compiled, tick.fire_at)}
                drafts.append(schedule_draft(following, fid, tick.fire_at, item))
                fired_at = tick.fire_at
        # The pair's clock passes these ticks: the scheduler must not fire them again
        # when real time gets there, so next_fire_at moves past the window.
        current = schedule["next_fire_at"]
        if current is not None and current < end:
            upcoming = next_fire(compiled, end - _EPSILON)
            ended = compiled.ends_at is not None and compiled.ends_at <= end
            moves.append(
                {
                    "id": schedule["id"],
                    "version": schedule["version"],
                    "next_fire_at": upcoming,
                    "last_fire_at": fired_at or schedule["last_fire_at"],
                    "enabled": not (ended and upcoming is None),
                    # A fire the scheduler staged in the window fired here (same
                    # fire id; its own message later finds the notification made).
                    "staged_fire_at": None,
                }
            )
    for wakeup in state.wakeups:
        item = inventory_item(state.items.get(wakeup["inventory_item_id"] or ""), wakeup)
        drafts.append(wakeup_draft(wakeup, item))
    # In order of the simulated instants; ties broken by kind then id, for determinism.
    drafts.sort(key=lambda d: (d.fire_at, d.block.kind.value, d.source_id))
    fires.sort(key=lambda f: (f["fire_at"], f["id"]))
    return AdvancePlan(window, offset_s, fires, drafts, moves)


def response_body(hours: float, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    The advance-time response: exactly the SDK model's keys, nothing else.

    ``wakeups_executed`` lists every fire in order; a schedule fire's
    ``wakeup_id`` is its fire id.
    """
    return {
        "days_processed": int(hours // 24),
        "consolidation_ran": False,
        "weekly_consolidations": 0,
        "diary_entries_created": 0,
        "consolidation_processed": 0,
        "diary_entries": [],
        "wakeups_executed": [
            {
                "wakeup_id": row["source_id"],
                "agent_id": row["agent_id"],
                "user_id": row["user_id"],
                "check_type": row["check_type"],
                "intent": row["intent"],
                "generated_message": row["generated_message"],
            }
            for row in rows
        ],
    }
