"""
The in-process hand-off on the real store (SQLite and PostgreSQL) and a real JetStream:
the scheduler holds the outbox rows of the fires the queue has room for and hands them
over after its commit; the rest go to the relay at once; the dispatcher stamps what it
was handed, and the relay publishes only what was never stamped.
"""

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from delivery.clock import ManualClock
from delivery.dispatcher.app import Dispatcher
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.handoff import Handoff
from delivery.outbox import OutboxRelay
from delivery.scheduler import Scheduler
from delivery.settings import Settings
from delivery.store.outbox import OutboxStore
from tests.daemon.helpers import NOTIFICATIONS, OUTBOX, add_schedules, count, due_daily_rows, rows

T = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
GRACE = timedelta(seconds=30)


async def test_fires_beyond_the_queue_go_to_the_relay(engine, bus, project):
    """Room for 5: five fires are held and handed over, the other seven relayed at once."""
    await add_schedules(engine, due_daily_rows(12, T, T - timedelta(days=1)))
    clock = ManualClock(T + timedelta(seconds=1))
    handoff = Handoff(5, GRACE)
    scheduler = Scheduler(engine, bus.subjects, claim_batch=100, handoff=handoff)

    result = await scheduler.tick(clock.now())

    assert (result.fired, result.handed, result.outbox) == (12, 5, 7)
    handed = await handoff.take(100, 0.0)
    assert len(handed) == 5
    assert handoff.reserve(1) == 0, "a taken batch keeps its room until it is done"
    handoff.done(len(handed))
    assert handoff.reserve(1) == 1, "the grant was released with the put, the room when done"
    handoff.cancel(1)
    held = await rows(
        engine, select(OUTBOX.c.msg_id).where(OUTBOX.c.available_at == clock.now() + GRACE)
    )
    assert {r.msg_id for r in held} == {ref.id for ref in handed}

    # The relay publishes the seven, not the held five.
    relay = OutboxRelay(engine, bus.js, clock)
    try:
        assert (await relay.drain()).published == 7
        processor = Processor(engine, TemplateComposer(), bus.subjects, clock)
        made = await processor.process(handed, handed=True)
        assert len(made.created) == 5
        # Past the grace nothing is left to publish but the notifications' own rows.
        clock.advance(GRACE * 2)
        assert (await relay.drain()).published == 5
        fire_rows = OUTBOX.c.subject == bus.subjects.fire_created
        assert await count(engine, OUTBOX, fire_rows, OUTBOX.c.sent_at.is_(None)) == 0
    finally:
        await relay.aclose()


async def test_a_held_row_never_stamped_is_relayed_after_the_grace(engine, bus, project):
    """A hand-off whose dispatcher died: the relay publishes the row once the grace ends."""
    await add_schedules(engine, due_daily_rows(3, T, T - timedelta(days=1)))
    clock = ManualClock(T + timedelta(seconds=1))
    scheduler = Scheduler(engine, bus.subjects, handoff=Handoff(10, GRACE))
    assert (await scheduler.tick(clock.now())).handed == 3
    relay = OutboxRelay(engine, bus.js, clock)
    try:
        assert (await relay.drain()).published == 0
        clock.advance(GRACE)
        assert (await relay.drain()).published == 3
    finally:
        await relay.aclose()
    assert await count(engine, NOTIFICATIONS) == 0


async def test_release_held_makes_a_dead_process_rows_available(engine, bus, project):
    """At the start of the one process on the database, held fire rows are released."""
    await add_schedules(engine, due_daily_rows(3, T, T - timedelta(days=1)))
    clock = ManualClock(T + timedelta(seconds=1))
    scheduler = Scheduler(engine, bus.subjects, handoff=Handoff(10, GRACE))
    await scheduler.tick(clock.now())

    released = await OutboxStore(engine).release_held(bus.subjects.fire_created, clock.now())

    assert released == 3
    relay = OutboxRelay(engine, bus.js, clock)
    try:
        assert (await relay.drain()).published == 3
    finally:
        await relay.aclose()


async def test_a_closed_queue_grants_nothing_and_drains():
    """After close no room is granted; what was put is still taken, then an empty batch."""
    handoff = Handoff(4, GRACE)
    granted = handoff.reserve(10)
    assert granted == 4
    assert handoff.reserve(1) == 0
    handoff.close()
    assert handoff.reserve(1) == 0
    refs = [SourceRef(SourceKind.SCHEDULE, f"fire_{i}") for i in range(3)]
    handoff.put(refs, granted)
    assert await handoff.take(2, 1.0) == refs[:2]
    assert await handoff.take(2, 1.0) == refs[2:]
    assert await handoff.take(2, 1.0) == []


async def _five_handed(engine, bus, nats_url) -> tuple[ManualClock, Handoff, Dispatcher]:
    """Five fires handed off to a queue with room for five, and its dispatcher."""
    await add_schedules(engine, due_daily_rows(5, T, T - timedelta(days=1)))
    clock = ManualClock(T + timedelta(seconds=1))
    handoff = Handoff(5, GRACE)
    scheduler = Scheduler(engine, bus.subjects, claim_batch=100, handoff=handoff)
    assert (await scheduler.tick(clock.now())).handed == 5
    settings = Settings(subject_prefix=bus.subjects.prefix, composer="template")
    dispatcher = Dispatcher(settings, engine, nats_url=nats_url, clock=clock, handoff=handoff)
    return clock, handoff, dispatcher


async def test_a_handed_batch_keeps_its_room_until_the_dispatcher_wrote_it(
    engine, bus, project, nats_url
):
    """
    The queue's bound covers the rows being written, not only those queued: room
    taken by a batch comes back once the dispatcher has stamped it.
    """
    _, handoff, dispatcher = await _five_handed(engine, bus, nats_url)
    try:
        handed = await handoff.take(100, 0.0)
        assert handoff.reserve(1) == 0, "the taken batch's rows are still held"
        made = await dispatcher._handle_local(handed)
        assert len(made.created) == 5
        assert handoff.reserve(5) == 5, "the written batch gave its room back"
        handoff.cancel(5)
    finally:
        await dispatcher.stop()
    fire_rows = OUTBOX.c.subject == bus.subjects.fire_created
    assert await count(engine, OUTBOX, fire_rows, OUTBOX.c.sent_at.is_(None)) == 0


async def test_a_failed_handed_batch_gives_its_room_back_and_leaves_its_rows_held(
    engine, bus, project, nats_url, monkeypatch
):
    """
    A batch whose processing raises commits nothing: its room comes back at once,
    and its outbox rows stay unsent and held, for the relay once the grace ends.
    """
    clock, handoff, dispatcher = await _five_handed(engine, bus, nats_url)

    async def fails(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the store went away")

    monkeypatch.setattr(dispatcher.processor, "process", fails)
    try:
        handed = await handoff.take(100, 0.0)
        assert len(handed) == 5
        made = await dispatcher._handle_local(handed)
        assert made.created == []
        assert handoff.reserve(5) == 5, "the failed batch gave its room back"
        handoff.cancel(5)
    finally:
        await dispatcher.stop()
    assert await count(engine, NOTIFICATIONS) == 0
    fire_rows = OUTBOX.c.subject == bus.subjects.fire_created
    held = OUTBOX.c.available_at > clock.now()
    assert await count(engine, OUTBOX, fire_rows, OUTBOX.c.sent_at.is_(None), held) == 5
