"""
A fire or a trigger event handed off in-process: its held outbox row is stamped sent
in the transaction that writes its notification, on SQLite and PostgreSQL. Both commit
or neither, so a crash can leave a notification without the stamp only as it left it
before (the relay publishes, the unique source id absorbs), never a stamp without a
notification.

A database trigger refuses one of the two writes; the other must not commit either.
"""

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.messages import EventAccepted, FireCreated
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef, notification_id
from delivery.store.tables import NotificationRow, OutboxRow
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 1, 0, 5, tzinfo=UTC)
FIRE_AT = datetime(2026, 5, 2, 1, 0, tzinfo=UTC)
HELD_UNTIL = NOW + timedelta(seconds=30)

_SQLITE = {
    "stamp": "CREATE TRIGGER refuse BEFORE UPDATE OF sent_at ON outbox "
    "WHEN NEW.sent_at IS NOT NULL BEGIN SELECT RAISE(ABORT, 'stamp refused'); END",
    "insert": "CREATE TRIGGER refuse BEFORE INSERT ON notifications "
    "BEGIN SELECT RAISE(ABORT, 'insert refused'); END",
}
_PG_FUNCTION = (
    "CREATE FUNCTION refuse() RETURNS trigger AS $$ "
    "BEGIN RAISE EXCEPTION 'refused'; END $$ LANGUAGE plpgsql"
)
_PG = {
    "stamp": "CREATE TRIGGER refuse BEFORE UPDATE OF sent_at ON outbox FOR EACH ROW "
    "WHEN (NEW.sent_at IS NOT NULL) EXECUTE FUNCTION refuse()",
    "insert": "CREATE TRIGGER refuse BEFORE INSERT ON notifications FOR EACH ROW "
    "EXECUTE FUNCTION refuse()",
}


async def _handed_fire(engine: AsyncEngine) -> str:
    """A committed fire and its ``fire.created`` row held for the in-process dispatcher."""
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await rows.fire(engine, "sch_1", FIRE_AT)
    payload = FireCreated(fire_id=fid, schedule_id="sch_1", fire_at=FIRE_AT)
    await rows.insert(
        engine,
        OutboxRow,
        subject="tp.fire.created",
        msg_id=fid,
        payload=payload.model_dump_json(),
        created_at=NOW,
        available_at=HELD_UNTIL,
    )
    return fid


CARRIER = {"X-Request-Id": "req_storm_1"}


async def _handed_event(engine: AsyncEngine) -> str:
    """A committed trigger event and its ``event.accepted`` row held for the dispatcher."""
    await rows.project(engine)
    await rows.event(engine, "evt_1")
    await rows.insert(
        engine,
        OutboxRow,
        subject="tp.event.accepted",
        msg_id="evt_1",
        payload=EventAccepted(event_id="evt_1").model_dump_json(),
        headers=json.dumps(CARRIER),
        created_at=NOW,
        available_at=HELD_UNTIL,
    )
    return "evt_1"


def _processor(engine: AsyncEngine) -> Processor:
    return Processor(engine, TemplateComposer(), Subjects("tp"), ManualClock(NOW))


async def _fire_entry(engine: AsyncEngine, fid: str) -> dict[str, object]:
    [entry] = [o for o in await rows.outbox(engine) if o["msg_id"] == fid]
    return entry


async def test_handed_fire_is_stamped_with_its_notification(engine: AsyncEngine) -> None:
    """The batch's commit writes the notification and stamps the held row sent."""
    fid = await _handed_fire(engine)

    result = await _processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)], handed=True)

    assert result.created == [notification_id(fid)]
    assert (await _fire_entry(engine, fid))["sent_at"] == NOW
    # The notification's own entry is queued as ever, unsent.
    [created] = [o for o in await rows.outbox(engine) if o["msg_id"] == notification_id(fid)]
    assert created["sent_at"] is None


async def test_a_fire_from_jetstream_leaves_its_row_to_the_relay(engine: AsyncEngine) -> None:
    """Without the hand-off the dispatcher stamps nothing: the relay did (or will)."""
    fid = await _handed_fire(engine)

    await _processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])

    assert (await _fire_entry(engine, fid))["sent_at"] is None


async def test_a_handed_duplicate_is_stamped_without_a_second_notification(
    engine: AsyncEngine,
) -> None:
    """A fire whose notification exists (nothing to write) is still stamped."""
    fid = await _handed_fire(engine)
    ref = SourceRef(SourceKind.SCHEDULE, fid)
    await _processor(engine).process([ref])

    result = await _processor(engine).process([ref], handed=True)

    assert result.duplicates == [fid]
    assert await rows.count(engine, NotificationRow) == 1
    assert (await _fire_entry(engine, fid))["sent_at"] == NOW


async def _refuse(engine: AsyncEngine, refused: str) -> None:
    """Install a trigger that makes the database refuse the stamp or the insert."""
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            await conn.execute(text(_SQLITE[refused]))
        else:
            await conn.execute(text(_PG_FUNCTION))
            await conn.execute(text(_PG[refused]))


async def _assert_left_for_the_relay(engine: AsyncEngine, source_id: str) -> None:
    """No notification, and the source's outbox row still unsent and held."""
    assert await rows.count(engine, NotificationRow) == 0
    entry = await _fire_entry(engine, source_id)
    assert entry["sent_at"] is None
    assert entry["available_at"] == HELD_UNTIL


@pytest.mark.parametrize("refused", ["stamp", "insert"])
async def test_stamp_and_notification_commit_together(engine: AsyncEngine, refused: str) -> None:
    """
    The database refuses one of the two writes: the other is rolled back with it, so
    the row stays unsent (the relay will publish it) and no notification exists.
    """
    fid = await _handed_fire(engine)
    await _refuse(engine, refused)

    with pytest.raises(Exception, match="refused"):
        await _processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)], handed=True)

    await _assert_left_for_the_relay(engine, fid)


async def test_handed_event_is_stamped_with_its_notification(engine: AsyncEngine) -> None:
    """
    An accepted event handed over by the API: its notification and the stamp commit
    together, and the request id it was handed with reaches the notification's entry
    (as the headers of its JetStream message would have).
    """
    eid = await _handed_event(engine)

    result = await _processor(engine).process(
        [SourceRef(SourceKind.EVENT, eid)], carriers={eid: dict(CARRIER)}, handed=True
    )

    assert result.created == [notification_id(eid)]
    assert (await _fire_entry(engine, eid))["sent_at"] == NOW
    created = await _fire_entry(engine, notification_id(eid))
    assert created["sent_at"] is None
    assert json.loads(str(created["headers"]))["X-Request-Id"] == CARRIER["X-Request-Id"]


@pytest.mark.parametrize("refused", ["stamp", "insert"])
async def test_event_stamp_and_notification_commit_together(
    engine: AsyncEngine, refused: str
) -> None:
    """A handed event whose stamp or notification is refused keeps neither: the relay has it."""
    eid = await _handed_event(engine)
    await _refuse(engine, refused)

    with pytest.raises(Exception, match="refused"):
        await _processor(engine).process([SourceRef(SourceKind.EVENT, eid)], handed=True)

    await _assert_left_for_the_relay(engine, eid)
