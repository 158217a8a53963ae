"""
A store operation written once as steps leaves the same rows whichever runner runs it:
SQLite's driver thread or SQLAlchemy Core (what PostgreSQL and advance-time use).
"""

from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Table, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.dispatcher.process import (
    event_draft,
    notification_batch,
    schedule_draft,
    wakeup_draft,
)
from delivery.domain import SourceKind, SourceRef
from delivery.store import direct
from delivery.store.engine import create_engine, write_transaction
from delivery.store.notifications import (
    EVENTS,
    NOTIFICATIONS,
    OUTBOX,
    WAKEUPS,
    NotificationBatch,
    SqlNotificationStore,
    Written,
    loading,
    writing,
)
from delivery.store.steps import InsertRows, SelectWhere, run_core, run_direct
from delivery.store.tables import ScheduleRow, TriggerEventRow, WakeupRow
from delivery.store.tables import metadata as all_tables
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 1, 0, tzinfo=UTC)
AHEAD = NOW + timedelta(seconds=40)
SUBJECTS = Subjects("st")

type Run = Callable[[AsyncEngine, Any], Coroutine[Any, Any, Any]]


async def by_core(engine: AsyncEngine, steps: Any) -> Any:
    async with write_transaction(engine) as conn:
        return await run_core(steps, conn)


async def by_driver_thread(engine: AsyncEngine, steps: Any) -> Any:
    return await direct.write(engine, lambda db: run_direct(steps, db))


@pytest.fixture
async def sqlite_pair(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """Two SQLite files with every table: one per runner."""
    engines = [create_engine(f"sqlite+aiosqlite:///{tmp_path / name}") for name in "ab"]
    for eng in engines:
        async with eng.begin() as conn:
            await conn.run_sync(all_tables.create_all)
    try:
        yield engines[0], engines[1]
    finally:
        for eng in engines:
            await eng.dispose()


async def seed(engine: AsyncEngine) -> str:
    """Two wakeups (one cancelled), an accepted event, and a fire staged ahead; its fire id."""
    await rows.project(engine)
    await rows.schedule(engine)
    await rows.wakeup(engine, "wk_1", scheduled_at=NOW)
    await rows.wakeup(engine, "wk_2", scheduled_at=NOW, status="cancelled")
    await rows.event(engine)
    return await rows.fire(engine, "sch_1", AHEAD, created_at=NOW)


async def batch(
    engine: AsyncEngine, fid: str, message: str, *, restage: bool = True
) -> NotificationBatch:
    """What the dispatcher writes for all four sources (a restage replaces the fire's row)."""
    drafts = [
        schedule_draft(await rows.row(engine, ScheduleRow, "sch_1"), fid, AHEAD, None),
        wakeup_draft(await rows.row(engine, WakeupRow, "wk_1"), None),
        wakeup_draft(await rows.row(engine, WakeupRow, "wk_2"), None),
        event_draft(await rows.row(engine, TriggerEventRow, "evt_1")),
    ]
    composed = [(d, message, None) for d in drafts]
    replace = [fid] if restage else []
    return notification_batch(composed, subjects=SUBJECTS, now=NOW, replace=replace)


async def dump(engine: AsyncEngine) -> dict[str, list[dict[str, Any]]]:
    tables: list[Table] = [NOTIFICATIONS, OUTBOX, WAKEUPS, EVENTS]
    out = {}
    async with engine.connect() as conn:
        for table in tables:
            result = await conn.execute(select(table).order_by(*table.primary_key.columns))
            out[table.name] = [dict(r) for r in result.mappings()]
    return out


async def write_twice(engine: AsyncEngine, run: Run) -> tuple[Written, Written]:
    """A staged write, then the same sources composed again over it (a restage)."""
    fid = await seed(engine)
    first = await run(engine, writing(await batch(engine, fid, "first")))
    second = await run(engine, writing(await batch(engine, fid, "second")))
    return first, second


async def test_both_runners_write_the_same_rows(
    sqlite_pair: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """The driver-thread and Core runners leave identical rows and report the same writes."""
    on_thread, on_core = sqlite_pair
    assert await write_twice(on_thread, by_driver_thread) == await write_twice(on_core, by_core)
    assert await dump(on_thread) == await dump(on_core)


async def test_both_runners_read_the_same_sources(
    sqlite_pair: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """Loading a batch's sources gives the same rows on both runners, instants included."""
    engine, _ = sqlite_pair
    fid = await seed(engine)
    refs = [
        SourceRef(SourceKind.SCHEDULE, fid),
        SourceRef(SourceKind.WAKEUP, "wk_1"),
        SourceRef(SourceKind.EVENT, "evt_1"),
        SourceRef(SourceKind.WAKEUP, "wk_1"),
    ]
    on_thread = await direct.read(engine, lambda db: run_direct(loading(refs), db))
    async with engine.connect() as conn:
        on_core = await run_core(loading(refs), conn)
    assert on_thread == on_core
    assert on_thread.duplicates == ["wk_1"]
    assert on_thread.fires[fid]["fire_at"] == AHEAD


async def test_a_write_keeps_its_contract_on_each_database(engine: AsyncEngine) -> None:
    """
    A cancelled wakeup's notification is not written, writing the same batch again
    changes nothing, and a restage replaces only the staged row.
    """
    store = SqlNotificationStore(engine)
    fid = await seed(engine)
    first = await store.write_notifications(await batch(engine, fid, "first", restage=False))
    assert first.lost == ["wk_2"]
    assert [r["source_id"] for r in first.rows] == [fid, "wk_1", "evt_1"]
    state = await dump(engine)
    statuses = {r["source_id"]: r["status"] for r in state["notifications"]}
    assert statuses == {fid: "staged", "wk_1": "pending", "evt_1": "pending"}
    assert sorted(o["msg_id"] for o in state["outbox"]) == sorted(
        r["id"] for r in state["notifications"]
    )
    assert [(w["status"], w["executed_at"]) for w in state["wakeups"]] == [
        ("executed", NOW),
        ("cancelled", None),
    ]
    assert [e["status"] for e in state[EVENTS.name]] == ["dispatched"]

    await store.write_notifications(await batch(engine, fid, "first", restage=False))
    assert await dump(engine) == state

    await store.write_notifications(await batch(engine, fid, "second"))
    messages = {
        r["source_id"]: r["generated_message"] for r in (await dump(engine))["notifications"]
    }
    assert messages == {fid: "second", "wk_1": "first", "evt_1": "first"}


def _reading(step: SelectWhere) -> Any:
    found = yield step
    return found


def _inserting(step: InsertRows) -> Any:
    yield step


async def test_select_where_and_insert_rows_are_the_same_on_both_runners(
    sqlite_pair: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """
    Rows inserted by either runner are equal, and a filtered, ordered, limited read
    (``None`` as ``IS NULL``, instants converted) answers the same on both.
    """
    on_thread, on_core = sqlite_pair
    for engine, run in ((on_thread, by_driver_thread), (on_core, by_core)):
        await rows.project(engine)
        wakeups = [
            WakeupRow(
                id=f"wk_{n}",
                project_id="proj_1",
                agent_id="a1",
                user_id="u1" if n % 2 else "u2",
                check_type="c",
                intent="i",
                occasion=None if n % 3 else "birthday",
                scheduled_at=NOW - timedelta(minutes=n),
                status="pending",
                created_at=NOW,
            ).model_dump()
            for n in range(1, 7)
        ]
        await run(engine, _inserting(InsertRows(WAKEUPS, wakeups)))
    assert await dump(on_thread) == await dump(on_core)

    for step in (
        SelectWhere(WAKEUPS, {"user_id": "u1"}, order_by=("scheduled_at", "id"), limit=2),
        SelectWhere(WAKEUPS, {"occasion": None}, columns=("id", "scheduled_at")),
        SelectWhere(WAKEUPS, {"agent_id": "a1", "user_id": "u2", "occasion": "birthday"}),
        SelectWhere(WAKEUPS, {"agent_id": "nobody"}),
    ):
        thread_rows = await direct.read(on_thread, partial(run_direct, _reading(step)))
        async with on_thread.connect() as conn:
            core_rows = await run_core(_reading(step), conn)
        assert thread_rows == core_rows
        if step.equals.get("user_id") == "u1":
            assert [r["id"] for r in thread_rows] == ["wk_5", "wk_3"]
            assert thread_rows[0]["scheduled_at"] == NOW - timedelta(minutes=5)


async def test_insert_rows_refuses_a_taken_key_on_both_runners(
    sqlite_pair: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """Unlike InsertIgnoring, a duplicate primary key raises and writes nothing."""
    on_thread, on_core = sqlite_pair
    for engine, run in ((on_thread, by_driver_thread), (on_core, by_core)):
        await rows.project(engine)
        await rows.wakeup(engine, "wk_1", scheduled_at=NOW)
        again = await rows.row(engine, WakeupRow, "wk_1")
        fresh = {**again, "id": "wk_2"}
        with pytest.raises(IntegrityError):
            await run(engine, _inserting(InsertRows(WAKEUPS, [fresh, again])))
        assert [w["id"] for w in (await dump(engine))["wakeups"]] == ["wk_1"]
