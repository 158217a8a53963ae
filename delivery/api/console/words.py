"""
Schedules in words for the console, pure: a cadence as a sentence ("every weekday at
08:30 in Europe/London, 07:00-21:00") and the next fires in the schedule's zone with
the daylight-saving changes between them marked.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from delivery.cadence import format_local

_DAY_NAMES = {
    "mon": "Monday",
    "tue": "Tuesday",
    "wed": "Wednesday",
    "thu": "Thursday",
    "fri": "Friday",
    "sat": "Saturday",
    "sun": "Sunday",
}
_ORDER = list(_DAY_NAMES)
_WEEKDAYS = ["mon", "tue", "wed", "thu", "fri"]
_WEEKEND = ["sat", "sun"]


def _days(days: Sequence[str]) -> str:
    """``weekday``, ``weekend day``, ``day`` (all seven) or ``Monday and Thursday``."""
    ordered = sorted(set(days), key=_ORDER.index)
    if ordered == _ORDER:
        return "day"
    if ordered == _WEEKDAYS:
        return "weekday"
    if ordered == _WEEKEND:
        return "weekend day"
    names = [_DAY_NAMES[d] for d in ordered]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _times(times: Sequence[str]) -> str:
    items = list(times)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def window_words(window: Mapping[str, Any] | None) -> str:
    """An active window as a suffix: ``07:00-21:00``, ``Monday and Friday 07:00-21:00``."""
    if not window:
        return ""
    parts: list[str] = []
    days = window.get("days_of_week")
    if days:
        parts.append("on " + ("every " + _days(days) if _days(days) != "day" else "every day"))
    hours = window.get("hours")
    if isinstance(hours, Mapping):
        parts.append(f"{hours.get('start')}-{hours.get('end')}")
    return " ".join(parts)


def cadence_words(cadence_json: str, timezone: str, active_window_json: str | None) -> str:
    """
    The schedule's cadence as a sentence, from its stored (normalised) JSON.

    ``every weekday at 08:30 in Europe/London, 07:00-21:00``; a cron cadence is
    quoted (``cron "0 9 * * 1-5" in UTC``).
    """
    cadence = json.loads(cadence_json)
    simple = cadence.get("simple") if isinstance(cadence, dict) else None
    if isinstance(simple, Mapping):
        frequency = simple.get("frequency")
        if frequency == "interval_hours":
            hours = int(simple.get("interval_hours", 1))
            text = "every hour" if hours == 1 else f"every {hours} hours"
        elif frequency == "weekly":
            text = f"every {_days(simple.get('days_of_week', []))} at {_times(simple['times'])}"
        else:
            text = f"every day at {_times(simple.get('times', []))}"
    else:
        expression = cadence.get("cron") if isinstance(cadence, dict) else cadence
        if isinstance(expression, Mapping):
            expression = expression.get("expression", json.dumps(expression))
        text = f'cron "{expression}"'
    text += f" in {timezone}"
    window = json.loads(active_window_json) if active_window_json else None
    suffix = window_words(window)
    return f"{text}, {suffix}" if suffix else text


@dataclass(frozen=True, slots=True)
class LocalFire:
    """One upcoming fire: its instant, its wall time in the zone, and a DST note."""

    at: datetime
    local: str
    dst_change: str | None
    """``clocks go back: +01:00 → +00:00`` when the offset changed since the previous."""


def _offset_text(offset: timedelta | None) -> str:
    minutes = int((offset or timedelta()).total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def local_fires(fires: Sequence[datetime], zone_name: str, now: datetime) -> list[LocalFire]:
    """
    ``fires`` (aware UTC) in ``zone_name``; a fire whose UTC offset differs from the
    one before it (or from ``now``'s, for the first) is marked with the change.
    """
    zone = ZoneInfo(zone_name)
    previous = now.astimezone(zone).utcoffset()
    out: list[LocalFire] = []
    for fire in fires:
        offset = fire.astimezone(zone).utcoffset()
        note = None
        if offset != previous:
            direction = (
                "clocks go forward"
                if (offset or timedelta()) > (previous or timedelta())
                else "clocks go back"
            )
            note = f"{direction}: {_offset_text(previous)} → {_offset_text(offset)}"
        out.append(LocalFire(at=fire, local=format_local(fire, zone), dst_change=note))
        previous = offset
    return out
