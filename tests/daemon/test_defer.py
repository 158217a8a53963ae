"""
``outside_window: "defer"`` on a schedule, scheduler and dispatcher together, on SQLite
and PostgreSQL: a tick outside the active window fires and its message waits for the
window's next opening (DST-correct), at most once, and never past the next regular
fire, which then supersedes it. Without ``defer`` the tick is skipped, as before.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.scheduler import Scheduler
from delivery.store.staging import promote
from tests.daemon.helpers import FIRES, NOTIFICATIONS, add_schedules, rows, schedule_row

DEFER = '{"outside_window":"defer"}'


async def fire_and_dispatch(engine: Any, bus: Any, at: datetime) -> list[str]:
    """One scheduler pass at ``at`` and the dispatch of what it fired; the fire ids."""
    result = await Scheduler(engine, bus.subjects).drain(at)
    processor = Processor(engine, TemplateComposer(), bus.subjects, ManualClock(at))
    await processor.process([SourceRef(SourceKind.SCHEDULE, f) for f in result.fire_ids])
    return list(result.fire_ids)


async def notes(engine: Any) -> dict[str, Any]:
    found = await rows(
        engine,
        select(
            NOTIFICATIONS.c.source_id,
            NOTIFICATIONS.c.status,
            NOTIFICATIONS.c.status_reason,
            NOTIFICATIONS.c.fire_at,
        ),
    )
    return {r.source_id: r for r in found}


async def test_defer_across_spring_forward_opens_after_the_gap(engine, bus, project):
    """
    Daily 01:00 New York, window 02:30-22:00, defer. On 2026-03-08 02:30 never
    happens (02:00 -> 03:00): the 01:00 EST fire is delivered at 03:00 EDT (07:00 UTC),
    once; the next day's fire is its own.
    """
    created = datetime(2026, 3, 1, tzinfo=UTC)
    first = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)  # 01:00 EST
    row = schedule_row(
        "sch_d",
        cadence={
            "simple": {"frequency": "daily", "times": ["01:00"]},
            "timezone": "America/New_York",
        },
        active_window={"hours": {"start": "02:30", "end": "22:00"}},
        created_at=created,
        next_fire_at=first,
    )
    await add_schedules(engine, [{**row, "policy_json": DEFER}])

    [fid] = await fire_and_dispatch(engine, bus, first)

    opening = datetime(2026, 3, 8, 7, 0, tzinfo=UTC)  # 03:00 EDT
    note = (await notes(engine))[fid]
    assert (note.status, note.status_reason, note.fire_at) == (
        "staged",
        "deferred_active_window",
        opening,
    )
    assert await promote(engine, opening - timedelta(seconds=1)) == 0
    assert await promote(engine, opening) == 1
    assert (await notes(engine))[fid].status == "pending"
    # Delivered once: the next pass fires the next day's tick, not this one again.
    assert await fire_and_dispatch(engine, bus, opening + timedelta(hours=1)) == []
    assert len(await notes(engine)) == 1


async def test_the_next_regular_fire_supersedes_a_deferral_past_it(engine, bus, project):
    """
    Hourly, window 09:00-17:00 UTC, defer: the 16:00 fire is sent; the 17:00 one would
    wait for 09:00 tomorrow, after the 18:00 fire, so it is recorded superseded.
    """
    day = datetime(2026, 6, 1, tzinfo=UTC)
    row = schedule_row(
        "sch_h",
        cadence={"cron": "0 * * * *", "timezone": "UTC"},
        active_window={"hours": {"start": "09:00", "end": "17:00"}},
        created_at=day - timedelta(days=1),
        next_fire_at=day.replace(hour=16),
    )
    await add_schedules(engine, [{**row, "policy_json": DEFER}])

    [inside] = await fire_and_dispatch(engine, bus, day.replace(hour=16))
    [outside] = await fire_and_dispatch(engine, bus, day.replace(hour=17))

    found = await notes(engine)
    assert found[inside].status == "pending"
    assert (found[outside].status, found[outside].status_reason) == (
        "superseded",
        "next_regular_fire",
    )
    fired = await rows(engine, select(FIRES.c.fire_at, FIRES.c.status))
    assert {(f.fire_at.hour, f.status) for f in fired} == {(16, "fired"), (17, "fired")}


async def test_without_defer_the_tick_outside_the_window_is_skipped(engine, bus, project):
    """The default is unchanged: the 17:00 tick is a skipped fire, no message."""
    day = datetime(2026, 6, 1, tzinfo=UTC)
    row = schedule_row(
        "sch_s",
        cadence={"cron": "0 * * * *", "timezone": "UTC"},
        active_window={"hours": {"start": "09:00", "end": "17:00"}},
        created_at=day - timedelta(days=1),
        next_fire_at=day.replace(hour=16),
    )
    await add_schedules(engine, [{**row, "policy_json": None}])

    await fire_and_dispatch(engine, bus, day.replace(hour=16))
    assert await fire_and_dispatch(engine, bus, day.replace(hour=17)) == []

    assert len(await notes(engine)) == 1
