"""
Scheduler -> outbox relay -> JetStream -> dispatcher with a manual clock, the real store
(both databases) and a real NATS server: every fire gives exactly one notification,
also when the relay runs twice and when the same fire is delivered twice.
"""

from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from delivery.bus.messages import FireCreated
from delivery.bus.stream import MSG_ID_HEADER
from delivery.clock import ManualClock
from delivery.dispatcher.app import Dispatcher
from delivery.outbox import OutboxRelay
from delivery.scheduler import Scheduler
from delivery.settings import Settings
from tests.daemon.helpers import (
    FIRES,
    NOTIFICATIONS,
    OUTBOX,
    add_schedules,
    count,
    due_daily_rows,
    rows,
    wakeup_row,
)
from tests.daemon.helpers import WAKEUPS as WAKEUP_TABLE

T = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


async def test_every_fire_and_wakeup_gives_exactly_one_notification(engine, bus, project, nats_url):
    """Relay replays and a duplicate delivery never make a second notification."""
    await add_schedules(engine, due_daily_rows(30, T, T - timedelta(days=2)))
    async with engine.begin() as conn:
        await conn.execute(WAKEUP_TABLE.insert(), [wakeup_row("wk_1", T)])
    clock = ManualClock(T + timedelta(seconds=2))
    scheduler = Scheduler(engine, bus.subjects, claim_batch=7)
    relay = OutboxRelay(engine, bus.js, clock, batch=8)
    ticked = await scheduler.drain(clock.now())
    assert (ticked.fired, ticked.wakeups, ticked.conflicts) == (30, 1, 0)

    assert (await relay.drain()).published == 31
    async with engine.begin() as conn:  # the relay crashed before stamping: replay all
        await conn.execute(update(OUTBOX).values(sent_at=None))
    assert (await relay.drain()).duplicates == 31

    # A copy that JetStream cannot dedupe (another msg id): the dispatcher sees
    # the same fire twice.
    fire = (await rows(engine, select(FIRES).limit(1)))[0]
    copy = FireCreated(fire_id=fire.id, schedule_id=fire.schedule_id, fire_at=fire.fire_at)
    await bus.js.publish(
        bus.subjects.fire_created,
        copy.model_dump_json().encode(),
        headers={MSG_ID_HEADER: f"{fire.id}-copy"},
    )
    assert await bus.stream_messages() == 32

    settings = Settings(subject_prefix=bus.subjects.prefix, composer="template")
    dispatcher = Dispatcher(settings, engine, nats_url=nats_url, clock=clock)
    try:
        result = await dispatcher.drain(idle_s=0.3)
    finally:
        await dispatcher.stop()
    assert len(result.created) == 31
    assert len(result.duplicates) == 1

    fired = {r.id for r in await rows(engine, select(FIRES.c.id))}
    sources = [r.source_id for r in await rows(engine, select(NOTIFICATIONS.c.source_id))]
    assert sorted(sources) == sorted([*fired, "wk_1"])
    assert await count(engine, NOTIFICATIONS, NOTIFICATIONS.c.status == "pending") == 31
    [wakeup] = await rows(engine, select(WAKEUP_TABLE.c.status))
    assert wakeup.status == "executed"
    # The next tick does not re-emit the executed wakeup nor refire anything.
    later = await scheduler.drain(clock.advance(timedelta(minutes=5)))
    assert (later.fired, later.wakeups) == (0, 0)
