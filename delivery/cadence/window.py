"""
Active-window membership: quiet hours and allowed days (the Sonzai ``active_window``).

Pure. A fire outside the window is skipped, never deferred.
"""


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
