"""
Hypothesis strategies for the cadence engine: zones, instants near transitions, schedules.

Instants are drawn from 1975-2045, where every zone's UTC offset is a whole
number of minutes (the reference walks UTC minutes).
"""

import zoneinfo
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from hypothesis import strategies as st

import delivery  # noqa: F401  (pins zoneinfo to the tzdata package first)

ALL_ZONES = sorted(zoneinfo.available_timezones())
# Zones whose transitions are unusual: 30-minute and 45-minute shifts, midnight
# transitions, negative DST, skipped days, southern hemisphere, no DST at all.
INTERESTING_ZONES = [
    "America/New_York",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Dublin",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/Santiago",
    "America/Havana",
    "America/Asuncion",
    "Pacific/Apia",
    "Pacific/Kiritimati",
    "Asia/Tehran",
    "Africa/Casablanca",
    "Australia/Sydney",
    "Antarctica/Troll",
    "Asia/Kolkata",
    "UTC",
]
FIRST_YEAR, LAST_YEAR = 1975, 2045
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

zones = st.one_of(st.sampled_from(INTERESTING_ZONES), st.sampled_from(ALL_ZONES))


@lru_cache(maxsize=4096)
def transitions(zone_name: str, year: int) -> tuple[datetime, ...]:
    """UTC instants (to the minute) where the zone's offset changes during ``year``."""
    zone = zoneinfo.ZoneInfo(zone_name)
    step = timedelta(hours=3)
    t = datetime(year, 1, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC)
    found = []
    previous = t.astimezone(zone).utcoffset()
    while t < end:
        nxt = t + step
        offset = nxt.astimezone(zone).utcoffset()
        if offset != previous:
            low, high = t, nxt  # offset(low) == previous, offset(high) == new
            while high - low > timedelta(minutes=1):
                mid = low + (high - low) / 2
                mid = mid.replace(second=0, microsecond=0)
                if mid.astimezone(zone).utcoffset() == previous:
                    low = mid
                else:
                    high = mid
            found.append(high)
        previous = offset
        t = nxt
    return tuple(found)


@st.composite
def instants(draw: st.DrawFn, zone_name: str) -> datetime:
    """An aware UTC instant, usually within a few days of one of the zone's transitions."""
    year = draw(st.integers(FIRST_YEAR, LAST_YEAR))
    near = transitions(zone_name, year)
    near_a_transition = draw(st.integers(0, 3)) > 0  # three times in four
    if near and near_a_transition:
        base = draw(st.sampled_from(near))
        offset = draw(
            st.one_of(
                st.integers(-180, 180),  # minutes: right around the jump
                st.integers(-4 * 1440, 2 * 1440),
            )
        )
        instant = base + timedelta(minutes=offset)
    else:
        start = datetime(year, 1, 1, tzinfo=UTC)
        instant = start + timedelta(minutes=draw(st.integers(0, 365 * 1440)))
    return instant + timedelta(seconds=draw(st.sampled_from([0, 0, 0, 1, 30, 59])))


def _hhmm(hour: int, minute: int) -> str:
    return f"{hour:02d}:{minute:02d}"


# Hours biased to where transitions happen (00-03, 23), minutes to :00/:30/:45.
hours = st.one_of(st.sampled_from([0, 1, 2, 3, 23]), st.integers(0, 23))
minutes = st.one_of(st.sampled_from([0, 15, 30, 45]), st.integers(0, 59))
times = st.lists(st.builds(_hhmm, hours, minutes), min_size=1, max_size=4, unique=True)
day_sets = st.lists(st.sampled_from(DAYS), min_size=1, max_size=7, unique=True)

CRON_MINUTES = ["0", "30", "*/15", "0,30", "15-45/15", "5", "59", "*/20", "45", "0-10/5", "5/15"]
CRON_HOURS = ["*", "0", "1", "2", "3", "1-3", "*/6", "0,12", "9", "23", "22-23", "2-4/2"]
CRON_DOMS = ["*", "*", "1", "15", "*/2", "31", "29", "1-7", "13", "28-31"]
CRON_MONTHS = ["*", "*", "3", "10", "3,10", "4-10", "JAN-MAR", "nov", "*/3"]
CRON_DOWS = ["*", "*", "0", "7", "1-5", "MON-FRI", "sun", "6,0", "*/2", "5", "5-7", "1/2"]
cron_expressions = st.builds(
    lambda *fields: " ".join(fields),
    *(
        st.sampled_from(choices)
        for choices in (CRON_MINUTES, CRON_HOURS, CRON_DOMS, CRON_MONTHS, CRON_DOWS)
    ),
)


@st.composite
def cadences(draw: st.DrawFn, zone_name: str) -> dict[str, Any]:
    """A valid-looking cadence object in ``zone_name`` (density is not checked)."""
    kind = draw(st.sampled_from(["daily", "weekly", "interval_hours", "cron"]))
    if kind == "cron":
        return {"cron": draw(cron_expressions), "timezone": zone_name}
    simple: dict[str, Any] = {"frequency": kind}
    if kind == "interval_hours":
        simple["interval_hours"] = draw(st.one_of(st.sampled_from([1, 4, 24]), st.integers(1, 24)))
    else:
        simple["times"] = draw(times)
    if kind == "weekly":
        simple["days_of_week"] = draw(day_sets)
    return {"simple": simple, "timezone": zone_name}


@st.composite
def windows(draw: st.DrawFn) -> dict[str, Any] | None:
    """None, or an active window with hours (possibly wrapping), days, or both."""
    shape = draw(st.sampled_from(["none", "none", "hours", "days", "both"]))
    if shape == "none":
        return None
    window: dict[str, Any] = {}
    if shape in ("hours", "both"):
        start = draw(st.builds(_hhmm, hours, minutes))
        end = draw(st.builds(_hhmm, hours, minutes).filter(lambda e: e != start))
        window["hours"] = {"start": start, "end": end}
    if shape in ("days", "both"):
        window["days_of_week"] = draw(day_sets)
    return window


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    """A schedule body plus a query range ``(after, until]`` near a transition."""
    zone_name = draw(zones)
    after = draw(instants(zone_name))
    span = timedelta(minutes=draw(st.integers(1, 4 * 1440)))
    starts_at = ends_at = None
    if draw(st.booleans()):
        starts_at = after + timedelta(minutes=draw(st.integers(-2 * 1440, 2 * 1440)))
    if draw(st.integers(0, 3)) == 0:
        base = starts_at or after
        ends_at = base + timedelta(minutes=draw(st.integers(1, 5 * 1440)))
    created_at = after - timedelta(
        seconds=draw(st.integers(0, 30 * 86400)), microseconds=draw(st.integers(0, 999_999))
    )
    return {
        "cadence": draw(cadences(zone_name)),
        "active_window": draw(windows()),
        "starts_at": starts_at,
        "ends_at": ends_at,
        "created_at": created_at,
        "after": after,
        "until": after + span,
    }
