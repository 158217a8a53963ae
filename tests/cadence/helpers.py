"""Shared helpers for the cadence example tables: build schedules, read fires as wall strings."""

from datetime import UTC, datetime
from typing import Any

from delivery.cadence import CompiledSchedule, compile_schedule, format_local, upcoming

CREATED = datetime(2020, 1, 1, tzinfo=UTC)


def utc(text: str) -> datetime:
    """An aware UTC datetime from ``2026-03-08T06:00`` (seconds optional)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def daily(zone: str, *times: str, window: Any = None, **bounds: Any) -> CompiledSchedule:
    return compile_schedule(
        {"simple": {"frequency": "daily", "times": list(times)}, "timezone": zone},
        window,
        created_at=bounds.pop("created_at", CREATED),
        **bounds,
    )


def cron(zone: str, expression: str, window: Any = None, **bounds: Any) -> CompiledSchedule:
    return compile_schedule(
        {"cron": expression, "timezone": zone},
        window,
        created_at=bounds.pop("created_at", CREATED),
        **bounds,
    )


def local_fires(schedule: CompiledSchedule, after: str, n: int) -> list[str]:
    """The next ``n`` fires after ``after`` (UTC) as RFC 3339 local strings with offsets."""
    return [format_local(f, schedule.zone) for f in upcoming(schedule, utc(after), n)]
