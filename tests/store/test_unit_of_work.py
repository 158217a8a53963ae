"""The request transaction (``unit_of_work``), one test body for SQLite and PostgreSQL."""

import asyncio

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.engine import after_commit, create_engine, unit_of_work, url_text
from delivery.store.sql import SqlStore
from delivery.store.steps import InsertRows, Runner, Steps
from delivery.store.tables import WAKEUPS, WakeupRow
from tests.store.test_sql import NOW, _wakeup


async def _outside_count(engine: AsyncEngine) -> int:
    """Counted by another task, so outside the unit: only committed rows."""
    return await asyncio.create_task(SqlStore(engine).count(WAKEUPS))


async def test_writes_commit_together_and_only_on_commit(engine: AsyncEngine) -> None:
    """Every store write in a unit is one transaction: invisible to others until commit."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id
    async with unit_of_work(engine) as unit:
        await store.wakeups.insert_wakeup(_wakeup(project, 1))
        await store.wakeups.insert_wakeup(_wakeup(project, 2))
        # The unit reads its own writes; nobody else sees them yet.
        assert await store.count(WAKEUPS) == 2
        assert await _outside_count(engine) == 0
        await unit.commit()
    assert await store.count(WAKEUPS) == 2


async def test_a_unit_left_without_commit_rolls_back(engine: AsyncEngine) -> None:
    """An exception (a crash of the request) or a plain exit without commit writes nothing."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id

    async def failing_request() -> None:
        async with unit_of_work(engine):
            await store.wakeups.insert_wakeup(_wakeup(project, 1))
            raise RuntimeError("the route failed")

    with pytest.raises(RuntimeError):
        await failing_request()
    async with unit_of_work(engine):
        await store.wakeups.insert_wakeup(_wakeup(project, 2))
    assert await store.count(WAKEUPS) == 0


async def test_a_failed_block_rolls_back_alone(engine: AsyncEngine) -> None:
    """A store call failing inside a unit undoes only its own writes, as its transaction did."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id
    async with unit_of_work(engine) as unit:
        await store.wakeups.insert_wakeup(_wakeup(project, 1))

        async def failing_call() -> None:
            async with store.write() as conn:
                await conn.execute(WAKEUPS.insert().values(**_wakeup(project, 2).model_dump()))
                raise RuntimeError("validation failed after a write")

        with pytest.raises(RuntimeError):
            await failing_call()
        await unit.commit()
    async with store.read() as conn:
        ids = [r.id for r in await conn.execute(WAKEUPS.select())]
    assert ids == ["wk_1"]


async def test_after_commit_runs_only_after_a_commit(engine: AsyncEngine) -> None:
    """Deferred callbacks run after the commit, never after a rollback, at once outside a unit."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id
    seen: list[str] = []
    after_commit(engine, lambda: seen.append("outside"))
    assert seen == ["outside"]
    async with unit_of_work(engine) as unit:
        await store.wakeups.insert_wakeup(_wakeup(project, 1))
        after_commit(engine, lambda: seen.append(f"committed:{len(seen)}"))
        assert seen == ["outside"]
        await unit.commit()
    assert seen == ["outside", "committed:1"]
    async with unit_of_work(engine):
        after_commit(engine, lambda: seen.append("rolled back"))
    assert seen == ["outside", "committed:1"]


async def test_tasks_started_inside_a_unit_write_on_their_own(engine: AsyncEngine) -> None:
    """A task started by the request does not join its transaction (it commits by itself)."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id
    async with unit_of_work(engine):
        # On SQLite the unit has not written yet, so the writer lock is free for the task.
        await asyncio.create_task(store.wakeups.insert_wakeup(_wakeup(project, 1)))
    assert await store.count(WAKEUPS) == 1


async def test_a_failed_store_call_in_a_unit_undoes_only_its_own_writes(
    engine: AsyncEngine,
) -> None:
    """
    A store call that fails inside a unit after writing part of its rows (the second
    of two inserts hits a taken id) leaves none of its own rows and all of the unit's
    earlier ones, on SQLite's driver-thread path as on Core.
    """
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id

    def inserting(*rows: WakeupRow) -> Steps[None]:
        yield InsertRows(WAKEUPS, [r.model_dump() for r in rows])

    async with unit_of_work(engine) as unit:
        await store.wakeups.insert_wakeup(_wakeup(project, 1))
        with pytest.raises(IntegrityError):
            await Runner(engine).write(inserting(_wakeup(project, 3), _wakeup(project, 1)))
        await store.wakeups.insert_wakeup(_wakeup(project, 2))
        await unit.commit()
    async with store.read() as conn:
        ids = [r.id for r in await conn.execute(WAKEUPS.select().order_by(WAKEUPS.c.id))]
    assert ids == ["wk_1", "wk_2"]


async def test_a_unit_joins_writes_on_its_database_whatever_the_engine_object(
    engine: AsyncEngine,
) -> None:
    """
    A unit is joined by writes through any engine on its database (the URL is
    what counts, made once per engine), never through an engine on another one,
    even one created where an earlier engine object lived.
    """
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id
    twin = create_engine(engine.url.render_as_string(hide_password=False))
    try:
        async with unit_of_work(engine) as unit:
            await SqlStore(twin).wakeups.insert_wakeup(_wakeup(project, 1))
            assert unit.began
            assert await _outside_count(engine) == 0
            await unit.commit()
        assert await store.count(WAKEUPS) == 1
    finally:
        await twin.dispose()
    # Engines come and go (CPython reuses their addresses): each is named by its own URL.
    for i in range(50):
        other = create_engine(f"sqlite+aiosqlite:////tmp/never-opened-{i}.db")
        assert url_text(other) == str(other.url)
        async with unit_of_work(engine) as unit:
            assert unit.joins(engine)
            assert not unit.joins(other)
        del other
