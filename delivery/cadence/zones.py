"""
Wall time -> UTC in a zone: the only code that decides gaps and folds.

Pure. A wall time inside a spring-forward gap does not exist; a wall time that
exists twice at a fall-back maps to its first occurrence (``fold=0``), so it
fires once (as the Sonzai "DST handling" docs describe).
"""

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


# Cached: two zone conversions cost ~3 us, a hit ~0.4 us, and the planner asks this
# several times per fire (next fire, the skip scan); schedules share a handful of
# zones and wall minutes (a burst's 09:00 in each zone), so most calls repeat. The
# result is an immutable value of the arguments alone; a ZoneInfo hashes by
# identity, so a zone loaded anew is simply a new key.
@lru_cache(maxsize=2048)
def wall_to_utc(
    year: int, month: int, day: int, minute_of_day: int, zone: ZoneInfo
) -> tuple[datetime, bool]:
    """
    Map a naive wall time to its first UTC instant and say whether it is in a gap.

    Returns:
        ``(instant, in_gap)``. ``instant`` is the ``fold=0`` mapping: for a
        fold this is the first occurrence; for a gap time, the offset in force
        before the transition applies (PEP 495), so it lands after the jump.
        ``in_gap`` is true when that instant, converted back to the zone, shows
        a different wall time: the wall time never appears on local clocks.
    """
    hour, minute = divmod(minute_of_day, 60)
    instant = datetime(year, month, day, hour, minute, tzinfo=zone).astimezone(UTC)
    back = instant.astimezone(zone)
    # Comparing the day too catches a whole skipped day (Pacific/Apia, 2011-12-30).
    return instant, (back.minute != minute or back.hour != hour or back.day != day)


def first_after_gap(at: datetime, zone: ZoneInfo) -> datetime:
    """
    The first instant after the spring-forward jump whose gap ``at`` fell in.

    ``at`` is a gap wall time's ``fold=0`` mapping (:func:`wall_to_utc`), which
    lands after the jump by the gap's width; the jump is the first whole minute
    before it that already has the new offset.
    """
    step = timedelta(minutes=1)
    after = at.astimezone(zone).utcoffset()
    probe = at
    while (probe - step).astimezone(zone).utcoffset() == after:
        probe -= step
    return probe
