"""
An independent, slow reference for the cadence engine, used by the property tests.

It never uses croniter or ``delivery.cadence``'s compiled code: it walks UTC
minutes, converts each to the zone's wall time, and asks a naive matcher
whether that wall time is a tick. A wall time shown twice (fold) counts at its
first showing (``fold == 0``); a wall time never shown is a DST-gap tick.
Valid only where UTC offsets are whole minutes (after ~1972 everywhere).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

MINUTE = timedelta(minutes=1)
# Gaps and folds are at most a day long; walk that much further either side.
MARGIN = timedelta(hours=26)
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
CRON_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
CRON_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class RefTick:
    """A tick as the reference sees it: UTC instant, naive wall time, skip reason."""

    fire_at: datetime
    local: datetime
    skipped: str | None


def _cron_value(token: str, names: tuple[str, ...] | None, first: int) -> int:
    if token.isdigit():
        return int(token)
    assert names is not None
    return names.index(token.lower()) + first


def cron_field_matches(
    text: str, value: int, low: int, high: int, names: tuple[str, ...] | None = None
) -> bool:
    """Whether ``value`` is selected by one cron field (assumes valid syntax)."""
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            first, last = low, high
        elif "-" in span:
            a, b = span.split("-")
            first, last = _cron_value(a, names, low), _cron_value(b, names, low)
        else:
            first = last = _cron_value(span, names, low)
            if step_text:
                # "a/n" runs to the field's end; day-of-week's is Saturday (croniter).
                last = max(6, first) if high == 7 else high
        if first <= value <= last and (value - first) % step == 0:
            return True
    return False


def cron_matches(expression: str, wall: datetime) -> bool:
    """Vixie cron: both day fields must match when either starts with ``*``, else either."""
    minute, hour, dom, month, dow = expression.split()
    if not cron_field_matches(minute, wall.minute, 0, 59):
        return False
    if not cron_field_matches(hour, wall.hour, 0, 23):
        return False
    if not cron_field_matches(month, wall.month, 1, 12, CRON_MONTHS):
        return False
    cron_dow = (wall.weekday() + 1) % 7
    dow_ok = cron_field_matches(dow, cron_dow, 0, 7, CRON_DAYS) or (
        cron_dow == 0 and cron_field_matches(dow, 7, 0, 7, CRON_DAYS)
    )
    dom_ok = cron_field_matches(dom, wall.day, 1, 31)
    if dom.startswith("*") or dow.startswith("*"):
        return dom_ok and dow_ok
    return dom_ok or dow_ok


@dataclass(frozen=True)
class RefSchedule:
    """The raw schedule body, read without any validation (inputs are assumed valid)."""

    cadence: dict[str, Any]
    window: dict[str, Any] | None
    starts_at: datetime | None
    ends_at: datetime | None
    created_at: datetime

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.cadence["timezone"])

    @property
    def interval(self) -> timedelta | None:
        simple = self.cadence.get("simple")
        if simple and simple["frequency"] == "interval_hours":
            return timedelta(hours=simple["interval_hours"])
        return None

    @property
    def anchor(self) -> datetime:
        """starts_at or created_at, rounded up to the whole minute (documented rule)."""
        base = self.starts_at or self.created_at
        floor = base.replace(second=0, microsecond=0)
        return floor if floor == base else floor + MINUTE

    def is_wall_tick(self, wall: datetime) -> bool:
        """For wall-clock cadences: whether this naive wall minute is a tick."""
        if "cron" in self.cadence and self.cadence["cron"] is not None:
            return cron_matches(self.cadence["cron"], wall)
        simple = self.cadence["simple"]
        if wall.strftime("%H:%M") not in simple["times"]:
            return False
        if simple["frequency"] == "weekly":
            return DAY_NAMES[wall.weekday()] in simple["days_of_week"]
        return True

    def in_window(self, wall: datetime) -> bool:
        if not self.window:
            return True
        days = self.window.get("days_of_week")
        if days is not None and DAY_NAMES[wall.weekday()] not in days:
            return False
        hours = self.window.get("hours")
        if hours is None:
            return True
        hm = wall.strftime("%H:%M:%S")
        start: str = hours["start"] + ":00"
        end: str = hours["end"] + ":00"
        if start < end:
            return start <= hm < end
        return hm >= start or hm < end

    def in_bounds(self, instant: datetime) -> bool:
        if self.starts_at is not None and instant < self.starts_at:
            return False
        return self.ends_at is None or instant < self.ends_at


def _utc_minutes(first: datetime, last: datetime) -> Iterator[datetime]:
    t = first.replace(second=0, microsecond=0)
    while t <= last:
        yield t
        t += MINUTE


def reference_ticks(ref: RefSchedule, after: datetime, until: datetime) -> list[RefTick]:
    """Every raw tick with ``after < fire_at <= until`` and within the bounds, by instant."""
    zone = ref.zone
    ticks: list[RefTick] = []
    interval = ref.interval
    if interval is not None:
        anchor = ref.anchor
        for t in _utc_minutes(after, until):
            if t <= after or t < anchor or (t - anchor) % interval or not ref.in_bounds(t):
                continue
            wall = t.astimezone(zone).replace(tzinfo=None)
            ticks.append(RefTick(t, wall, None if ref.in_window(wall) else "outside_active_window"))
        return ticks

    seen: set[datetime] = set()
    for t in _utc_minutes(after - MARGIN, until + MARGIN):
        local = t.astimezone(zone)
        wall = local.replace(tzinfo=None, fold=0)
        seen.add(wall)
        # fold == 1 is the second showing of a repeated wall time: never a new tick.
        if local.fold or not (after < t <= until) or not ref.in_bounds(t):
            continue
        if ref.is_wall_tick(wall):
            skip = None if ref.in_window(wall) else "outside_active_window"
            ticks.append(RefTick(t.astimezone(UTC), wall, skip))

    # Wall minutes no UTC minute showed are in a gap; their instant is fold=0's.
    wall = (after.astimezone(zone) - timedelta(days=1)).replace(
        tzinfo=None, second=0, microsecond=0
    )
    last_wall = (until.astimezone(zone) + timedelta(days=1)).replace(tzinfo=None)
    while wall <= last_wall:
        if wall not in seen and ref.is_wall_tick(wall):
            t = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
            if after < t <= until and ref.in_bounds(t):
                skip = "outside_active_window" if not ref.in_window(wall) else "dst_gap"
                ticks.append(RefTick(t, wall, skip))
        wall += MINUTE
    ticks.sort(key=lambda tick: (tick.fire_at, tick.local))
    return ticks
