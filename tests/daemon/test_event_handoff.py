"""
Trigger events handed off in-process, on the real store (SQLite and PostgreSQL) and a
real JetStream: the API's ingest holds the ``event.accepted`` rows of the events the
queue has room for and hands those events over after its commit, with their requests'
ids; the rest go through the relay and JetStream as without a hand-off. Every accepted
event ends with exactly one notification and every row sent.
"""

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.clock import ManualClock
from delivery.dispatcher.app import Dispatcher
from delivery.domain import SourceKind
from delivery.handoff import Handoff
from delivery.outbox import OutboxRelay
from delivery.settings import Settings
from delivery.store.outbox import OutboxStore
from delivery.store.sql import SqlStore
from tests.daemon.conftest import Bus
from tests.daemon.helpers import NOTIFICATIONS, OUTBOX, count, rows

T = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
GRACE = timedelta(seconds=30)
EVENTS = 6
ROOM = 2


async def _post_storm(
    engine: AsyncEngine, bus: Bus, clock: ManualClock, handoff: Handoff
) -> dict[str, str]:
    """POST ``EVENTS`` events at once through the app; event id -> the request's id."""
    store = SqlStore(engine)
    project = await store.keys.ensure_project("storm", T)
    key = await store.keys.create_api_key(project.id, T)
    settings = Settings(subject_prefix=bus.subjects.prefix, composer="template")
    app = create_app(settings, store, clock, handoff=handoff)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api.test", headers=headers
    ) as client:

        async def post(i: int) -> httpx.Response:
            return await client.post(
                "/api/v1/agents/agent_1/events",
                json={"user_id": f"user_{i}", "event_type": "level_up"},
                headers={"X-Request-Id": f"req-{i}"},
            )

        answers = await asyncio.gather(*(post(i) for i in range(EVENTS)))
    assert [a.status_code for a in answers] == [200] * EVENTS
    return {a.json()["event_id"]: f"req-{i}" for i, a in enumerate(answers)}


async def test_events_beyond_the_queue_go_through_jetstream(
    engine: AsyncEngine, bus: Bus, nats_url: str
) -> None:
    """
    Room for two: two events are held and handed over with their request ids, the
    other four are published by the relay and made by the dispatcher from JetStream.
    """
    clock = ManualClock(T)
    handoff = Handoff(ROOM, GRACE)
    accepted = await _post_storm(engine, bus, clock, handoff)

    handed = await handoff.take(100, 0.0)
    assert len(handed) == ROOM
    assert all(ref.kind is SourceKind.EVENT for ref in handed)
    handoff.done(len(handed))
    assert handoff.reserve(ROOM) == ROOM, "every grant was released with its put"
    handoff.cancel(ROOM)
    event_rows = OUTBOX.c.subject == bus.subjects.event_accepted
    held = await rows(
        engine, select(OUTBOX.c.msg_id).where(event_rows, OUTBOX.c.available_at == T + GRACE)
    )
    assert {r.msg_id for r in held} == {ref.id for ref in handed}
    carriers = handoff.carriers_of(handed)
    assert {eid: c["X-Request-Id"] for eid, c in carriers.items()} == {
        ref.id: accepted[ref.id] for ref in handed
    }

    relay = OutboxRelay(engine, bus.js, clock)
    settings = Settings(subject_prefix=bus.subjects.prefix, composer="template")
    dispatcher = Dispatcher(settings, engine, nats_url=nats_url, clock=clock)
    try:
        # The relay publishes the four, not the held two; the dispatcher makes their
        # notifications from JetStream.
        assert (await relay.drain()).published == EVENTS - ROOM
        from_stream = await dispatcher.drain(idle_s=0.3)
        assert len(from_stream.created) == EVENTS - ROOM
        made = await dispatcher.processor.process(handed, carriers=carriers, handed=True)
        assert len(made.created) == ROOM
        # Past the grace no event row is left unsent, so nothing is published twice.
        clock.advance(GRACE * 2)
        await relay.drain()
        assert await count(engine, OUTBOX, event_rows, OUTBOX.c.sent_at.is_(None)) == 0
    finally:
        await dispatcher.stop()
        await relay.aclose()
    sources = [r.source_id for r in await rows(engine, select(NOTIFICATIONS.c.source_id))]
    assert sorted(sources) == sorted(accepted)


async def test_release_held_covers_event_rows(engine: AsyncEngine, bus: Bus) -> None:
    """A killed process's held event rows are released at the next start, like fires'."""
    clock = ManualClock(T)
    handoff = Handoff(10, GRACE)
    await _post_storm(engine, bus, clock, handoff)
    assert len(handoff) == EVENTS

    released = await OutboxStore(engine).release_held(bus.subjects.event_accepted, clock.now())

    assert released == EVENTS
    relay = OutboxRelay(engine, bus.js, clock)
    try:
        assert (await relay.drain()).published == EVENTS
    finally:
        await relay.aclose()
