"""
Fire computation over a :class:`CompiledSchedule`: next fire, preview, raw ticks.

Pure: no clock, no I/O. Wall-clock cadences walk local days and precomputed
minute lists, converting each candidate through :mod:`delivery.cadence.zones`;
``interval_hours`` steps elapsed time from the anchor.
"""

from bisect import bisect_left
from datetime import date, datetime, timedelta

from delivery.cadence.model import CompiledSchedule, SkipReason, Tick
from delivery.cadence.window import in_hours
from delivery.cadence.zones import wall_to_utc
from delivery.errors import InvalidLimitError

_EPSILON = timedelta(microseconds=1)
# The Gregorian calendar repeats every 400 years (146097 days, a whole number of
# weeks), so a day rule that can fire at all fires within that many days.
_GRID_HORIZON_DAYS = 146_097
# DST rules repeat yearly; two years of elapsed time covers every wall-time
# shift an interval can take, so an interval that never meets its window in
# that span never will.
_INTERVAL_HORIZON = timedelta(days=731)
# Leave room for the +/- 2 day margins below at the end of datetime's range.
_MAX_ORDINAL = date.max.toordinal() - 3
# Gaps and folds are at most a day long (Apia skipped 2011-12-30 whole), so a
# tick's instant is within two local days of its wall time.
_MARGIN_DAYS = 2


def _lower_bound(schedule: CompiledSchedule, after: datetime) -> datetime:
    """The instant fires must be strictly after: ``after``, or just before starts_at."""
    if after.tzinfo is None:
        raise ValueError("after must be an aware datetime")
    if schedule.starts_at is not None and after < schedule.starts_at:
        # starts_at is inclusive: with microsecond resolution, "> starts_at - 1 us"
        # is exactly ">= starts_at".
        return schedule.starts_at - _EPSILON
    return after


def _day_allowed(schedule: CompiledSchedule, day: date, weekday: int) -> bool:
    if not schedule._month_ok[day.month]:
        return False
    dom = schedule._dom_ok[day.day]
    dow = schedule._dow_ok[weekday]
    return (dom and dow) if schedule._day_and else (dom or dow)


def _next_month_ordinal(day: date) -> int:
    if day.month == 12:
        return date(day.year + 1, 1, 1).toordinal()
    return date(day.year, day.month + 1, 1).toordinal()


def _next_grid(schedule: CompiledSchedule, lower: datetime) -> datetime | None:
    zone = schedule.zone
    local = lower.astimezone(zone)
    ordinal = local.toordinal()
    # Wall times map to instants monotonically (fold=0 is the earliest), so the
    # first candidate at or after lower's own wall minute that lands strictly
    # after lower is the answer; inside a fold's second pass a few candidates
    # land before lower and are passed over (never fired twice).
    first_minute = local.hour * 60 + local.minute
    end = schedule.ends_at
    last = min(ordinal + _GRID_HORIZON_DAYS, _MAX_ORDINAL)
    if end is not None:
        last = min(last, end.astimezone(zone).toordinal() + _MARGIN_DAYS)
    fire_minutes = schedule._fire_minutes
    every_day = schedule._every_day
    start = ordinal
    while ordinal <= last:
        minutes = fire_minutes[(ordinal + 6) % 7]  # ordinal 1 (0001-01-01) is a Monday
        if minutes:
            day = date.fromordinal(ordinal)
            if every_day or _day_allowed(schedule, day, (ordinal + 6) % 7):
                index = bisect_left(minutes, first_minute) if ordinal == start else 0
                year, month, dom = day.year, day.month, day.day
                for minute in minutes[index:]:
                    instant, in_gap = wall_to_utc(year, month, dom, minute, zone)
                    if in_gap or instant <= lower:
                        continue
                    if end is not None and instant >= end:
                        return None
                    return instant
            elif not schedule._month_ok[day.month]:
                ordinal = _next_month_ordinal(day)
                continue
        ordinal += 1
    return None


def _interval_in_window(schedule: CompiledSchedule, instant: datetime) -> bool:
    local = instant.astimezone(schedule.zone)
    if not schedule._window_days[local.weekday()]:
        return False
    minute_of_day = local.hour * 60 + local.minute + local.second / 60
    return in_hours(minute_of_day, schedule._window_start, schedule._window_end)


def _has_window(schedule: CompiledSchedule) -> bool:
    return schedule._window_start is not None or not all(schedule._window_days)


def _first_interval_fire(schedule: CompiledSchedule, step: timedelta, lower: datetime) -> datetime:
    # Floor division of timedeltas: the first grid point strictly after lower. The
    # grid starts at the anchor (starts_at, else creation): asked from an earlier
    # instant, the anchor itself is the first fire, never a point before it.
    count = max((lower - schedule.anchor) // step + 1, 0)
    return schedule.anchor + count * step


def _next_interval(schedule: CompiledSchedule, step: timedelta, lower: datetime) -> datetime | None:
    fire = _first_interval_fire(schedule, step, lower)
    # From the first candidate, not from lower: asked long before the anchor, the
    # anchor is still found.
    limit = fire + _INTERVAL_HORIZON
    windowed = _has_window(schedule)
    end = schedule.ends_at
    while fire <= limit:
        if end is not None and fire >= end:
            return None
        if not windowed or _interval_in_window(schedule, fire):
            return fire
        fire += step
    return None


def next_fire(schedule: CompiledSchedule, after: datetime) -> datetime | None:
    """
    The first fire strictly after ``after``, with the window and bounds applied.

    DST: a wall time in a spring-forward gap is skipped (the next valid
    occurrence fires); a wall time repeated at a fall-back fires once, at its
    first occurrence, even when ``after`` falls between the two occurrences.
    The result depends only on the schedule and ``after``: the set of fire
    instants is a property of the schedule.

    Args:
        schedule: a compiled schedule.
        after: an aware instant.

    Returns:
        An aware UTC datetime, or ``None`` when nothing fires before
        ``ends_at``, or when no fire survives the active window (searched up to
        400 years ahead for wall-clock cadences, two years for
        ``interval_hours``).

    Raises:
        ValueError: ``after`` is naive.
    """
    lower = _lower_bound(schedule, after)
    try:
        if schedule._interval is not None:
            return _next_interval(schedule, schedule._interval, lower)
        if schedule._never:
            return None
        return _next_grid(schedule, lower)
    except OverflowError:
        # The search walked off the end of datetime's range (year 9999).
        return None


def upcoming(schedule: CompiledSchedule, after: datetime, limit: int) -> list[datetime]:
    """
    The next ``limit`` fires strictly after ``after`` (the ``upcoming`` preview).

    Args:
        schedule: a compiled schedule.
        after: an aware instant.
        limit: how many fires at most; 0 gives ``[]``.

    Returns:
        Aware UTC datetimes in increasing order, active window applied; fewer
        than ``limit`` when the schedule ends.

    Raises:
        InvalidLimitError: ``limit`` is negative.
        ValueError: ``after`` is naive.
    """
    if limit < 0:
        raise InvalidLimitError("limit", f"limit must not be negative; got {limit}")
    fires: list[datetime] = []
    cursor = after
    while len(fires) < limit:
        fire = next_fire(schedule, cursor)
        if fire is None:
            break
        fires.append(fire)
        cursor = fire
    return fires


def _grid_ticks(schedule: CompiledSchedule, lower: datetime, until: datetime) -> list[Tick]:
    zone = schedule.zone
    end = schedule.ends_at
    # A gap tick's fold=0 instant lands after the jump, later than its wall
    # time suggests, so start the wall walk a margin before lower.
    first = max(lower.astimezone(zone).toordinal() - _MARGIN_DAYS, 1)
    last = min(until.astimezone(zone).toordinal() + _MARGIN_DAYS, _MAX_ORDINAL)
    if end is not None:
        last = min(last, end.astimezone(zone).toordinal() + _MARGIN_DAYS)
    ticks: list[Tick] = []
    for ordinal in range(first, last + 1):
        day = date.fromordinal(ordinal)
        weekday = day.weekday()
        if not _day_allowed(schedule, day, weekday):
            continue
        day_in_window = schedule._window_days[weekday]
        for minute in schedule._minutes:
            instant, in_gap = wall_to_utc(day.year, day.month, day.day, minute, zone)
            if instant <= lower or instant > until or (end is not None and instant >= end):
                continue
            skipped: SkipReason | None = None
            # The window is the schedule's own filter, so it is reported first.
            if not (
                day_in_window and in_hours(minute, schedule._window_start, schedule._window_end)
            ):
                skipped = SkipReason.OUTSIDE_ACTIVE_WINDOW
            elif in_gap:
                skipped = SkipReason.DST_GAP
            # Naive on purpose: a gap tick's wall time exists in no zone.
            wall = datetime(day.year, day.month, day.day, minute // 60, minute % 60)  # noqa: DTZ001
            ticks.append(Tick(fire_at=instant, local=wall, skipped=skipped))
    # Gap ticks land after the jump (fold=0 instant), so the wall order is not
    # the instant order near a transition; ties (Apia's skipped day) go by wall.
    ticks.sort(key=lambda tick: (tick.fire_at, tick.local))
    return ticks


def _interval_ticks(
    schedule: CompiledSchedule, step: timedelta, lower: datetime, until: datetime
) -> list[Tick]:
    end = schedule.ends_at
    ticks: list[Tick] = []
    fire = _first_interval_fire(schedule, step, lower)
    while fire <= until and (end is None or fire < end):
        local = fire.astimezone(schedule.zone).replace(tzinfo=None)
        skipped = None if _interval_in_window(schedule, fire) else SkipReason.OUTSIDE_ACTIVE_WINDOW
        ticks.append(Tick(fire_at=fire, local=local, skipped=skipped))
        fire += step
    return ticks


def ticks_between(schedule: CompiledSchedule, after: datetime, until: datetime) -> list[Tick]:
    """
    Every raw cadence tick with ``after < fire_at <= until``, skipped ones included.

    The scheduler records skipped ticks so an operator can see why a user got
    nothing. A tick outside the active window is
    :attr:`SkipReason.OUTSIDE_ACTIVE_WINDOW` (reported first: the schedule's own
    filter); a wall time in a DST gap is :attr:`SkipReason.DST_GAP` with
    ``fire_at`` its ``fold=0`` instant. Ticks outside ``[starts_at, ends_at)``
    are not ticks at all. Consecutive calls over ``(a, b]`` and ``(b, c]``
    return each tick exactly once.

    Returns:
        Ticks in increasing ``fire_at`` order; fired ones equal what
        :func:`next_fire` walks through.

    Raises:
        ValueError: ``after`` or ``until`` is naive.
    """
    if until.tzinfo is None:
        raise ValueError("until must be an aware datetime")
    lower = _lower_bound(schedule, after)
    if until <= lower:
        return []
    try:
        if schedule._interval is not None:
            return _interval_ticks(schedule, schedule._interval, lower, until)
        return _grid_ticks(schedule, lower, until)
    except OverflowError:
        return []
