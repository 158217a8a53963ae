"""
The cached instant texts (RFC 3339 for payloads, SQLite's column text) of the repeated
hour of a DST fall-back: the two local times differ only in ``fold``, compare and hash
equal, and are an hour apart, so each must be written as its own instant.
"""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from delivery.cadence.instants import format_local, format_utc
from delivery.store.direct import sqlite_instant

NEW_YORK = ZoneInfo("America/New_York")


def test_the_repeated_hour_is_written_as_two_instants() -> None:
    first = datetime(2025, 11, 2, 1, 30, tzinfo=NEW_YORK, fold=0)
    second = first.replace(fold=1)
    assert first == second  # why a cache keyed on the local value would be wrong
    assert format_utc(first) == "2025-11-02T05:30:00Z"
    assert format_utc(second) == "2025-11-02T06:30:00Z"
    assert sqlite_instant(first) == "2025-11-02 05:30:00.000000"
    assert sqlite_instant(second) == "2025-11-02 06:30:00.000000"
    assert format_utc(second.astimezone(UTC)) == "2025-11-02T06:30:00Z"


def test_the_repeated_hour_is_rendered_locally_with_both_offsets() -> None:
    """
    ``format_local`` caches UTC instants by (instant, zone): the two UTC instants of the
    repeated hour render with their own offsets, on a repeat call too; the two local
    times of that hour (equal, differing in ``fold``) are not taken for one another.
    """
    first = datetime(2025, 11, 2, 5, 30, tzinfo=UTC)
    second = datetime(2025, 11, 2, 6, 30, tzinfo=UTC)
    for _ in range(2):
        assert format_local(first, NEW_YORK) == "2025-11-02T01:30:00-04:00"
        assert format_local(second, NEW_YORK) == "2025-11-02T01:30:00-05:00"
        assert format_local(second, ZoneInfo("Asia/Tokyo")) == "2025-11-02T15:30:00+09:00"
    local = datetime(2025, 11, 2, 1, 30, tzinfo=NEW_YORK)
    assert format_local(local, NEW_YORK) == "2025-11-02T01:30:00-04:00"
    assert format_local(local.replace(fold=1), NEW_YORK) == "2025-11-02T01:30:00-05:00"
    assert format_local(datetime(2025, 11, 2, 6, 30, 0, 5, tzinfo=UTC), NEW_YORK) == (
        "2025-11-02T01:30:00.000005-05:00"
    )
