"""
Value types of the cadence engine: the compiled schedule, ticks and skip reasons.

Pure: no clock, no I/O, no sqlmodel/nats/httpx imports.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo


class SkipReason(StrEnum):
    """Why a raw cadence tick produced no fire (recorded by the scheduler for operators)."""

    OUTSIDE_ACTIVE_WINDOW = "outside_active_window"
    DST_GAP = "dst_gap"


@dataclass(frozen=True, slots=True)
class Tick:
    """
    One raw cadence tick, fired or skipped.

    Attributes:
        fire_at: aware UTC instant. For a :attr:`SkipReason.DST_GAP` tick the wall
            time does not exist; this is the instant it maps to with ``fold=0``
            (the offset in force before the transition).
        local: naive wall time of the tick in the schedule's zone.
        skipped: ``None`` when the tick fires, else why it does not.
    """

    fire_at: datetime
    local: datetime
    skipped: SkipReason | None


@dataclass(frozen=True, slots=True)
class CompiledSchedule:
    """
    A validated schedule, ready for fast next-fire computation.

    Build it with :func:`delivery.cadence.compile_schedule`, never directly: the
    private fields below are the compiled fast path and must agree with the
    public ones.

    Attributes:
        cadence: validated, normalised cadence object (what the API stores and
            echoes as canonical JSON: sorted keys, compact).
        active_window: validated, normalised window, or ``None`` (no window).
        cadence_type: ``"simple"`` or ``"cron"``.
        timezone: IANA zone name, exactly as the client spelt it.
        zone: the zone itself.
        starts_at: aware UTC lower bound (inclusive), or ``None``.
        ends_at: aware UTC upper bound (exclusive), or ``None``.
        anchor: aware UTC anchor of ``interval_hours``: ``starts_at`` or the
            creation instant, rounded up to the whole minute.
    """

    cadence: dict[str, Any]
    active_window: dict[str, Any] | None
    cadence_type: str
    timezone: str
    zone: ZoneInfo
    starts_at: datetime | None
    ends_at: datetime | None
    anchor: datetime
    # Compiled state. Wall-clock cadences (daily, weekly, cron) are a set of
    # allowed local days times one sorted list of minutes-of-day; interval_hours
    # is a step of elapsed time from the anchor.
    _interval: timedelta | None = field(default=None, repr=False)
    _minutes: tuple[int, ...] = field(default=(), repr=False)
    # Minutes that survive the active window, per local weekday (Monday = 0).
    _fire_minutes: tuple[tuple[int, ...], ...] = field(default=((),) * 7, repr=False)
    # Day rule, Vixie style: month_ok[1..12], dom_ok[1..31], dow_ok[0..6] with
    # Monday = 0 (Python's weekday()); day_and picks AND (a day field starts
    # with "*") over OR (both day fields restricted).
    _month_ok: tuple[bool, ...] = field(default=(True,) * 13, repr=False)
    _dom_ok: tuple[bool, ...] = field(default=(True,) * 32, repr=False)
    _dow_ok: tuple[bool, ...] = field(default=(True,) * 7, repr=False)
    _day_and: bool = field(default=True, repr=False)
    _every_day: bool = field(default=True, repr=False)
    # Active window in minutes of the day [start, end); start > end wraps midnight.
    _window_start: int | None = field(default=None, repr=False)
    _window_end: int | None = field(default=None, repr=False)
    _window_days: tuple[bool, ...] = field(default=(True,) * 7, repr=False)
    # True when no fire can ever survive the day rule and the window together.
    _never: bool = field(default=False, repr=False)
