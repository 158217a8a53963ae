"""
The polling read on the event loop's own SQLite connection: it runs there when it can,
and otherwise (a lock, an error, a unit of work that wrote, another thread) the read
goes the usual way with the same answer.
"""

import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store import direct
from delivery.store import engine as engine_module
from delivery.store.engine import create_engine, read_on_loop, unit_of_work, write_transaction
from delivery.store.notifications import (
    _INLINE_STATUSES,
    _QUEUE_NAMES,
    SqlNotificationStore,
    _queue_page,
)
from delivery.store.tables import NOTIFICATIONS, ProjectRow

PROJECTS = ProjectRow.__table__  # type: ignore[attr-defined]
T = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def _thread(db: sqlite3.Connection) -> int:
    db.execute("SELECT 1").fetchall()
    return threading.get_ident()


async def _pending(eng: AsyncEngine, message_id: str, **columns: object) -> None:
    async with write_transaction(eng) as conn:
        await conn.execute(
            NOTIFICATIONS.insert()
            .values(
                id=message_id,
                project_id="prj",
                agent_id="a1",
                user_id="u1",
                source_type="schedule",
                source_id=f"fire_{message_id}",
                event_type="on_recurring_event_due",
                check_type="reminder",
                generated_message="hi",
                status="pending",
                ack_status="pending",
                fire_at=T,
                created_at=T,
            )
            .values(**columns)
        )


async def test_the_read_runs_on_the_calling_thread(sqlite: AsyncEngine) -> None:
    assert read_on_loop(sqlite, _thread) == threading.get_ident()


async def test_the_queue_read_sees_committed_rows_from_the_loop_connection(
    sqlite: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqlNotificationStore(sqlite)
    read = await store.list_queue("prj", "a1", status="pending", user_id="u1", limit=10, now=T)
    assert read == []
    await _pending(sqlite, "msg_1")

    async def no_pool(*_args: object) -> None:
        raise AssertionError("read through the pool")

    monkeypatch.setattr(store._runner, "read", no_pool)
    rows = await store.list_queue("prj", "a1", status="pending", user_id="u1", limit=10, now=T)
    assert [row["id"] for row in rows] == ["msg_1"]


async def test_a_sqlite_error_sends_the_read_the_usual_way(sqlite: AsyncEngine) -> None:
    def locked(_db: sqlite3.Connection) -> int:
        raise sqlite3.OperationalError("database is locked")

    assert read_on_loop(sqlite, locked) is None
    # The connection is still usable afterwards.
    assert read_on_loop(sqlite, _thread) == threading.get_ident()


async def test_a_write_in_progress_does_not_block_or_hide_rows(sqlite: AsyncEngine) -> None:
    await _pending(sqlite, "msg_1")
    store = SqlNotificationStore(sqlite)
    async with write_transaction(sqlite) as conn:
        # The writer holds SQLite's write lock; the loop's reader does not wait for it
        # and sees the last committed state.
        await conn.execute(NOTIFICATIONS.update().values(status="consumed"))
        rows = await store.list_queue("prj", "a1", status="pending", user_id="u1", limit=10)
        assert [row["id"] for row in rows] == ["msg_1"]


async def test_inside_a_unit_that_wrote_the_read_sees_its_writes(sqlite: AsyncEngine) -> None:
    store = SqlNotificationStore(sqlite)
    async with unit_of_work(sqlite) as unit:
        await _pending(sqlite, "msg_1")
        assert read_on_loop(sqlite, _thread) is None
        rows = await store.list_queue("prj", "a1", status="pending", user_id="u1", limit=10)
        assert [row["id"] for row in rows] == ["msg_1"]
        await unit.rollback()


async def test_another_thread_reads_the_usual_way(sqlite: AsyncEngine) -> None:
    assert read_on_loop(sqlite, _thread) is not None
    found: list[object] = []
    worker = threading.Thread(target=lambda: found.append(read_on_loop(sqlite, _thread)))
    worker.start()
    worker.join()
    assert found == [None]


async def test_dispose_closes_the_loop_connection(sqlite: AsyncEngine) -> None:
    assert read_on_loop(sqlite, _thread) is not None
    reader = engine_module._LOOP_READERS[sqlite.sync_engine]
    assert reader is not None
    await sqlite.dispose()
    with pytest.raises(sqlite3.ProgrammingError):
        reader.db.execute("SELECT 1")
    # A read after the dispose goes the usual way: no new connection left unclosed.
    assert read_on_loop(sqlite, _thread) is None
    assert engine_module._LOOP_READERS[sqlite.sync_engine] is None


async def test_other_databases_and_memory_read_the_usual_way() -> None:
    for url in ("postgresql+asyncpg://user@127.0.0.1:1/none", "sqlite+aiosqlite://"):
        other = create_engine(url)
        try:
            assert read_on_loop(other, _thread) is None
        finally:
            await other.dispose()


async def test_the_queue_page_reads_what_select_where_reads(sqlite: AsyncEngine) -> None:
    later = T + timedelta(hours=1)
    await _pending(sqlite, "msg_1")
    await _pending(sqlite, "msg_2", user_id="u2", created_at=later)
    await _pending(sqlite, "msg_3", expires_at=T + timedelta(minutes=1))
    await _pending(sqlite, "msg_4", status="consumed", consumed_at=later, intent="x")
    await _pending(sqlite, "msg_5", agent_id="a2")
    await _pending(sqlite, "msg_6", wakeup_id="wk_1", source_type="wakeup", created_at=later)
    cases = [
        (owner, status, after, limit)
        for owner in (
            {"project_id": "prj", "agent_id": "a1"},
            {"project_id": "prj", "agent_id": "a1", "user_id": "u1"},
        )
        for status in sorted(_INLINE_STATUSES)
        for after in (None, T, later)
        for limit in (1, 50)
    ]
    for owner, status, after, limit in cases:
        expected = await direct.read(
            sqlite,
            partial(
                direct.select_where,
                table=NOTIFICATIONS,
                equals={**owner, "status": status},
                columns=_QUEUE_NAMES,
                order_by=("created_at", "id"),
                limit=limit,
                after=None if after is None else ("expires_at", after),
            ),
        )
        page = partial(_queue_page, owner=owner, status=status, limit=limit, after=after)
        assert read_on_loop(sqlite, page) == expected, (owner, status, after, limit)
    everyone = partial(
        _queue_page, owner={"project_id": "prj"}, status="pending", limit=50, after=None
    )
    assert [row["id"] for row in read_on_loop(sqlite, everyone) or []] == [
        "msg_1",
        "msg_3",
        "msg_5",
        "msg_2",
        "msg_6",
    ]


def test_the_queue_page_takes_only_known_statuses_and_owner_columns() -> None:
    db = sqlite3.connect(":memory:")
    with pytest.raises(ValueError, match="not a queue read"):
        _queue_page(db, owner={"project_id": "p"}, status="x' OR 1=1 --", limit=1, after=None)
    with pytest.raises(ValueError, match="not a queue read"):
        _queue_page(db, owner={"id": "p"}, status="pending", limit=1, after=None)


async def _expired_backlog(eng: AsyncEngine, expired: int, live: int) -> datetime:
    """
    ``expired`` pending rows past their deadline (not swept yet) before ``live``
    pending ones, for one (agent, user); the instant to read at.
    """
    rows = []
    for n in range(expired + live):
        created = T + timedelta(milliseconds=n)
        rows.append(
            {
                "id": f"msg_{n:07d}",
                "project_id": "prj",
                "agent_id": "a1",
                "user_id": "u1",
                "source_type": "event",
                "source_id": f"evt_{n:07d}",
                "event_type": "on_event",
                "check_type": "reminder",
                "generated_message": "hi",
                "status": "pending",
                "ack_status": "pending",
                "fire_at": created,
                "created_at": created,
                "expires_at": created + timedelta(minutes=1) if n < expired else None,
            }
        )
    async with write_transaction(eng) as conn:
        await conn.execute(NOTIFICATIONS.insert(), rows)
    return T + timedelta(hours=1)


async def test_a_backlog_of_expired_rows_does_not_hold_the_loop(sqlite: AsyncEngine) -> None:
    """
    Expired rows the sweep has not reached are filtered one by one: a read that
    examines more than the loop's budget is stopped there and runs on the pool's
    thread instead, with the same answer. A full page of live rows stays on the loop.
    """
    now = await _expired_backlog(sqlite, engine_module.LOOP_READ_STEPS // 2, 500)
    mine = {"project_id": "prj", "agent_id": "a1", "user_id": "u1"}
    for limit in (1, 50):
        page = partial(_queue_page, owner=mine, status="pending", limit=limit, after=now)
        assert read_on_loop(sqlite, page) is None
    # Read before the deadlines, the same rows are a page of live ones: it stays.
    page = partial(_queue_page, owner=mine, status="pending", limit=500, after=T)
    rows = read_on_loop(sqlite, page)
    assert rows is not None
    assert len(rows) == 500
    # The connection is left usable: a short read after a stopped one runs there.
    assert read_on_loop(sqlite, _thread) == threading.get_ident()


async def test_the_queue_reads_the_same_over_a_backlog_of_expired_rows(
    engine: AsyncEngine,
) -> None:
    """Whichever way the read went, a page skips the expired rows and nothing else."""
    expired = engine_module.LOOP_READ_STEPS // 2
    async with write_transaction(engine) as conn:
        await conn.execute(PROJECTS.insert().values(id="prj", name="p", created_at=T))
    now = await _expired_backlog(engine, expired, 3)
    store = SqlNotificationStore(engine)
    for user_id in ("u1", None):
        rows = await store.list_queue(
            "prj", "a1", status="pending", user_id=user_id, limit=50, now=now
        )
        assert [row["id"] for row in rows] == [f"msg_{n:07d}" for n in range(expired, expired + 3)]
        if engine.dialect.name == "sqlite":
            expected = await direct.read(
                engine,
                partial(
                    direct.select_where,
                    table=NOTIFICATIONS,
                    equals={
                        "project_id": "prj",
                        "agent_id": "a1",
                        **({"user_id": user_id} if user_id else {}),
                        "status": "pending",
                    },
                    columns=_QUEUE_NAMES,
                    order_by=("created_at", "id"),
                    limit=50,
                    after=("expires_at", now),
                ),
            )
            assert rows == expected
