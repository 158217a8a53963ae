"""The SqlStore contract, one test body for SQLite and PostgreSQL."""

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.bulk import OUTBOX
from delivery.store.common import canonical_json
from delivery.store.events import EventOutcome, EventWrite
from delivery.store.idempotency import IdempotencyRecord, idempotency_row
from delivery.store.notifications import ConsumeOutcome
from delivery.store.sql import SqlStore
from delivery.store.tables import (
    API_KEYS,
    EVENTS,
    IDEMPOTENCY,
    NOTIFICATIONS,
    SCHEDULES,
    WAKEUPS,
    ScheduleRow,
    TriggerEventRow,
    WakeupRow,
)
from delivery.store.wakeups import CancelOutcome
from tests.api.notes import add_notifications, notification

NOW = datetime(2026, 5, 1, tzinfo=UTC)
TTL = timedelta(hours=24)


def _wakeup(project: str, n: int) -> WakeupRow:
    return WakeupRow(
        id=f"wk_{n}",
        project_id=project,
        agent_id="a",
        user_id="u",
        check_type="c",
        intent="i",
        scheduled_at=NOW + timedelta(hours=n),
        created_at=NOW,
    )


async def _project(store: SqlStore, name: str = "p") -> str:
    return (await store.keys.ensure_project(name, NOW)).id


async def test_projects_and_keys(engine: AsyncEngine) -> None:
    """ensure_project is idempotent; keys resolve to their project and are stored hashed."""
    store = SqlStore(engine)
    first = await store.keys.ensure_project("acme", NOW)
    assert (await store.keys.ensure_project("acme", NOW)).id == first.id
    key = await store.keys.create_api_key(first.id, NOW)
    assert await store.keys.project_for_key(key, NOW) == first.id
    assert await store.keys.project_for_key(key + "x", NOW) is None
    assert await store.keys.create_api_key(first.id, NOW, key="fixed") == "fixed"
    assert await store.keys.create_api_key(first.id, NOW, key="fixed") == "fixed"  # no-op again
    assert await store.keys.project_for_key("fixed", NOW) == first.id
    async with store.read() as conn:
        stored = (await conn.execute(select(API_KEYS.c.key_hash))).scalars().all()
    assert key not in stored
    assert len(stored) == 2


async def test_idempotency_records(engine: AsyncEngine) -> None:
    """A recorded answer is found until it expires; a second record of one key is refused."""
    store = SqlStore(engine)
    project = await _project(store)

    async def record(route: str, key: str, digest: str, now: datetime, owner: str = "") -> bool:
        return await store.idempotency.record_idempotency(
            owner or project, route, key, digest, status_code=201, body="b", now=now, ttl=TTL
        )

    assert await store.idempotency.find_idempotency_record(project, "POST /x", "k", now=NOW) is None
    assert await record("POST /x", "k", "h1", NOW)
    assert not await record("POST /x", "k", "h2", NOW)
    found = await store.idempotency.find_idempotency_record(project, "POST /x", "k", now=NOW)
    assert found == IdempotencyRecord("h1", 201, "b")
    # Other route or project: independent.
    assert await record("POST /y", "k", "h1", NOW)
    other = await _project(store, "other")
    assert await record("POST /x", "k", "h9", NOW, other)
    # Expired: absent, and the key can be recorded again.
    later = NOW + TTL
    assert (
        await store.idempotency.find_idempotency_record(project, "POST /x", "k", now=later) is None
    )
    assert await record("POST /x", "k", "h2", later)
    assert await store.idempotency.purge_idempotency(NOW + 3 * TTL) == 3


async def test_reservations_of_older_versions_count_as_absent(engine: AsyncEngine) -> None:
    """A status-0 reservation row (left by a crashed older version) never blocks a retry."""
    store = SqlStore(engine)
    project = await _project(store)
    async with store.write() as conn:
        await conn.execute(
            IDEMPOTENCY.insert().values(
                project_id=project,
                route="POST /x",
                key="k",
                request_hash="h",
                status_code=0,
                response_body="",
                created_at=NOW,
                expires_at=NOW + TTL,
            )
        )
    assert await store.idempotency.find_idempotency_record(project, "POST /x", "k", now=NOW) is None
    assert await store.idempotency.record_idempotency(
        project, "POST /x", "k", "h", status_code=200, body="b", now=NOW, ttl=TTL
    )


async def test_concurrent_records_of_one_key_admit_exactly_one(engine: AsyncEngine) -> None:
    """Twenty simultaneous records of one key: exactly one is kept."""
    store = SqlStore(engine)
    project = await _project(store)
    kept = await asyncio.gather(
        *(
            store.idempotency.record_idempotency(
                project, "POST /x", "same", "h", status_code=201, body=str(n), now=NOW, ttl=TTL
            )
            for n in range(20)
        )
    )
    assert kept.count(True) == 1


async def test_concurrent_writers_do_not_fail(engine: AsyncEngine) -> None:
    """Many concurrent write transactions all commit (no SQLITE_BUSY on lock upgrade)."""
    store = SqlStore(engine)
    project = await _project(store)
    await asyncio.gather(*(store.wakeups.insert_wakeup(_wakeup(project, n)) for n in range(30)))
    outcomes = await asyncio.gather(
        *(store.wakeups.cancel_wakeup(project, "a", f"wk_{n}", NOW) for n in range(0, 30, 2)),
        *(
            store.idempotency.record_idempotency(
                project, "POST /x", f"k{n}", "h", status_code=201, body="", now=NOW, ttl=TTL
            )
            for n in range(15)
        ),
    )
    assert outcomes[:15] == [CancelOutcome.CANCELLED] * 15
    assert await store.count(WAKEUPS) == 30


async def test_cancel_wakeup_outcomes(engine: AsyncEngine) -> None:
    """Only an unclaimed pending wakeup cancels; others report why not."""
    store = SqlStore(engine)
    project = await _project(store)
    for n in (1, 2):
        await store.wakeups.insert_wakeup(_wakeup(project, n))
    async with store.write() as conn:
        await conn.execute(
            update(WAKEUPS).where(WAKEUPS.c.id == "wk_2").values(claimed_until=NOW + timedelta(1))
        )
    assert await store.wakeups.cancel_wakeup(project, "a", "wk_1", NOW) is CancelOutcome.CANCELLED
    again = await store.wakeups.cancel_wakeup(project, "a", "wk_1", NOW)
    assert again is CancelOutcome.ALREADY_CANCELLED  # the API answers a repeat the same
    assert await store.wakeups.cancel_wakeup(project, "a", "wk_2", NOW) is CancelOutcome.NOT_PENDING
    assert await store.wakeups.cancel_wakeup(project, "b", "wk_1", NOW) is CancelOutcome.NOT_FOUND
    other = await _project(store, "other")
    assert await store.wakeups.cancel_wakeup(other, "a", "wk_2", NOW) is CancelOutcome.NOT_FOUND
    listed = await store.wakeups.list_wakeups(
        project, "a", user_id=None, status="cancelled", limit=10
    )
    assert [w.id for w in listed] == ["wk_1"]


async def test_event_and_outbox_commit_together(engine: AsyncEngine) -> None:
    """The event row and its outbox message are one transaction: a failure writes neither."""
    store = SqlStore(engine)
    project = await _project(store)
    row = TriggerEventRow(
        id="evt_1", project_id=project, agent_id="a", user_id="u", event_type="t", created_at=NOW
    )
    outbox = {"subject": "s.event.accepted", "msg_id": "evt_1", "payload": "{}", "created_at": NOW}
    await store.events.insert_event(row, outbox)
    with pytest.raises(IntegrityError):
        await store.events.insert_event(row, {**outbox, "msg_id": "evt_1-again"})
    assert await store.count(EVENTS) == 1
    async with store.read() as conn:
        assert (await conn.execute(select(OUTBOX.c.msg_id))).scalars().all() == ["evt_1"]


def _event_write(
    project: str, event_id: str, key: str | None, digest: str, body: str
) -> EventWrite:
    """An accepted event's rows: the event, its outbox message, and its key's record."""
    row = TriggerEventRow(
        id=event_id, project_id=project, agent_id="a", user_id="u", event_type="t", created_at=NOW
    )
    outbox = {"subject": "s", "msg_id": event_id, "payload": "{}", "created_at": NOW}
    record = None
    if key is not None:
        record = idempotency_row(
            project,
            "POST /e",
            key,
            digest,
            status_code=200,
            body=body,
            now=NOW,
            ttl=timedelta(hours=1),
        )
    return EventWrite(row, outbox, record)


async def test_accepted_events_in_one_call_keep_one_event_per_key(engine: AsyncEngine) -> None:
    """
    accept_events: each key recorded first; a second write of a key in the same
    call, or of a key recorded before, is answered from that record and writes
    nothing; a dead record is replaced; the rest commit together.
    """
    store = SqlStore(engine)
    project = await _project(store)

    def write(n: int, key: str | None) -> EventWrite:
        return _event_write(project, f"evt_{n}", key, f"hash-{n}", f"body-{n}")

    await store.idempotency.record_idempotency(
        project,
        "POST /e",
        "old",
        "h",
        status_code=200,
        body="b",
        now=NOW - timedelta(hours=2),
        ttl=timedelta(hours=1),
    )
    outcomes = await store.events.accept_events(
        [write(1, "k"), write(2, "k"), write(3, None), write(4, "old"), write(5, "k2")], NOW
    )
    assert outcomes == [
        EventOutcome(written=True),
        EventOutcome(written=False, replay=IdempotencyRecord("hash-1", 200, "body-1")),
        EventOutcome(written=True),
        EventOutcome(written=True),
        EventOutcome(written=True),
    ]
    again = await store.events.accept_events([write(6, "k2")], NOW)
    assert again == [EventOutcome(written=False, replay=IdempotencyRecord("hash-5", 200, "body-5"))]
    async with store.read() as conn:
        events = (await conn.execute(select(EVENTS.c.id).order_by(EVENTS.c.id))).scalars().all()
        sent = (await conn.execute(select(OUTBOX.c.msg_id).order_by(OUTBOX.c.msg_id))).scalars()
        assert events == ["evt_1", "evt_3", "evt_4", "evt_5"]
        assert list(sent) == events
    assert await store.count(IDEMPOTENCY) == 3


async def test_schedule_compare_and_set(engine: AsyncEngine) -> None:
    """update_schedule writes only when the version is the one read."""
    store = SqlStore(engine)
    project = await _project(store)
    row = ScheduleRow(
        id="sch_1",
        project_id=project,
        agent_id="a",
        user_id="u",
        cadence_type="cron",
        cadence_json=canonical_json({"cron": "0 9 * * *", "timezone": "UTC"}),
        timezone="UTC",
        intent="i",
        check_type="c",
        anchor_at=NOW,
        next_fire_at=NOW,
        created_at=NOW,
        updated_at=NOW,
    )
    await store.schedules.insert_schedule(row)
    assert await store.schedules.update_schedule(
        row, {"intent": "x", "version": 2}, expected_version=1, now=NOW
    )
    assert not await store.schedules.update_schedule(
        row, {"intent": "y", "version": 2}, expected_version=1, now=NOW
    )
    got = await store.schedules.get_schedule(project, "a", "u", "sch_1")
    assert got is not None
    assert (got.intent, got.version) == ("x", 2)
    assert await store.schedules.get_schedule(project, "a", "other", "sch_1") is None
    assert await store.schedules.delete_schedule(project, "a", "u", "sch_1", now=NOW)
    assert await store.count(SCHEDULES) == 0


async def test_notification_queue_and_project_view(engine: AsyncEngine) -> None:
    """Queue reads are ordered and scoped; consume and acknowledge count only real changes."""
    store = SqlStore(engine)
    project, other = await _project(store), await _project(store, "other")
    rows = [notification(project, "a", "u", n, NOW) for n in range(1, 6)]
    rows.append(notification(other, "a", "u", 9, NOW))
    await add_notifications(engine, rows)
    await add_notifications(engine, rows[:2])  # unique on source_id: skipped
    assert await store.count(NOTIFICATIONS) == 6
    queue = await store.notifications.list_queue(
        project, "a", status="pending", user_id=None, limit=3
    )
    assert [r["generated_message"] for r in queue] == ["hello 1", "hello 2", "hello 3"]
    first = queue[0]["id"]
    assert (
        await store.notifications.consume_notification(project, "a", first, NOW)
        is ConsumeOutcome.CONSUMED
    )
    assert (
        await store.notifications.consume_notification(project, "a", first, NOW)
        is ConsumeOutcome.ALREADY
    )
    assert (
        await store.notifications.consume_notification(other, "a", first, NOW)
        is ConsumeOutcome.NOT_FOUND
    )
    history = await store.notifications.notification_history(project, "a", limit=10)
    assert history[0]["generated_message"] == "hello 5"
    assert len(history) == 5
    ids = [r["id"] for r in history]
    assert await store.notifications.acknowledge(project, [*ids[:2], rows[-1]["id"]], NOW) == 2
    assert await store.notifications.acknowledge(project, ids[:2], NOW) == 0
    assert (
        await store.notifications.acknowledge_all(project, agent_id="a", event_type=None, now=NOW)
        == 3
    )
    view = await store.notifications.list_project_notifications(
        project, agent_id=None, event_type=None, ack_status="pending", limit=10
    )
    assert view == []
    theirs = await store.notifications.list_project_notifications(
        other, agent_id="a", event_type=None, ack_status=None, limit=10
    )
    assert [r["ack_status"] for r in theirs] == ["pending"]


async def test_two_batches_sharing_keys_in_opposite_orders_both_finish(
    engine: AsyncEngine,
) -> None:
    """
    Two accept_events calls at once whose keys arrive in opposite orders (two API
    replicas): keys are recorded in key order, so on PostgreSQL one waits for the
    other instead of deadlocking. Each key ends with one event; the later batch is
    answered from the earlier one's records.
    """
    store = SqlStore(engine)
    project = await _project(store)
    keys = [f"k{n:03d}" for n in range(200)]

    def batch(prefix: str, order: list[str]) -> list[EventWrite]:
        return [
            _event_write(project, f"evt_{prefix}_{key}", key, f"hash-{prefix}", prefix)
            for key in order
        ]

    first, second = await asyncio.gather(
        store.events.accept_events(batch("a", keys), NOW),
        store.events.accept_events(batch("b", keys[::-1]), NOW),
    )
    written = sum(o.written for o in first) + sum(o.written for o in second)
    assert written == len(keys)
    assert await store.count(EVENTS) == len(keys)
