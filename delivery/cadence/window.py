"""
Active-window membership: quiet hours and allowed days (the Sonzai ``active_window``).

Pure. The engine skips a fire outside the window; a source that defers instead
is delivered at the window's next opening (:meth:`Window.next_inside`).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from delivery.cadence.zones import first_after_gap, wall_to_utc


def in_hours(minute_of_day: float, start: int | None, end: int | None) -> bool:
    """
    Whether a wall time, in minutes after midnight, is inside ``[start, end)``.

    ``start > end`` wraps midnight: 22:00-06:00 allows 22:00..05:59. ``None``
    bounds mean the window has no hours restriction.
    """
    if start is None or end is None:
        return True
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end


@dataclass(frozen=True, slots=True)
class Window:
    """
    A window of wall-clock time in ``zone``: minutes ``[start, end)`` (``None``: all
    day; ``start > end`` wraps midnight) on the allowed weekdays (Monday = 0). A
    schedule's active window, or the complement of a user's quiet hours.
    """

    zone: ZoneInfo
    start: int | None
    end: int | None
    days: tuple[bool, ...] = (True,) * 7

    def contains(self, instant: datetime) -> bool:
        """Whether ``instant`` falls inside, on the zone's wall clock (as the engine's ticks)."""
        local = instant.astimezone(self.zone)
        if not self.days[local.weekday()]:
            return False
        return in_hours(local.hour * 60 + local.minute + local.second / 60, self.start, self.end)

    def next_inside(self, instant: datetime) -> datetime | None:
        """
        The first instant at or after ``instant`` inside the window (``instant`` itself
        when inside), or ``None`` when no day is allowed.

        An opening is a wall time (``start``, or midnight of an allowed day when the
        window wraps or has no hours). One that falls in a spring-forward gap (02:30
        in New York on the second Sunday of March) opens at the first instant after
        the jump (03:00 local): the wall time never appears, and a day later would
        be a day late.
        """
        if self.contains(instant):
            return instant
        local = instant.astimezone(self.zone)
        openings = sorted(
            {0}
            if self.start is None or self.end is None
            else {self.start, 0}
            if self.start > self.end
            else {self.start}
        )
        for offset in range(9):
            day = local.date() + timedelta(days=offset)
            if not self.days[day.weekday()]:
                continue
            for minute in openings:
                at, in_gap = wall_to_utc(day.year, day.month, day.day, minute, self.zone)
                if in_gap:
                    at = first_after_gap(at, self.zone)
                if at > instant and self.contains(at):
                    return at
        return None
