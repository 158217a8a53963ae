"""
The API's create writes with their pair-clock check (``delivery.store.creates``):
a write built for the offset its pair no longer has writes nothing, not even its
``Idempotency-Key`` record, and says which offset it found. SQLite and PostgreSQL.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.advance import Pair
from delivery.store.creates import ExpectedOffset
from delivery.store.idempotency import idempotency_row
from delivery.store.sql import SqlStore
from delivery.store.tables import IDEMPOTENCY, OFFSETS, SCHEDULES, WAKEUPS, WakeupRow

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def _wakeup(project: str, wid: str) -> dict[str, Any]:
    return WakeupRow(
        id=wid,
        project_id=project,
        agent_id="a",
        user_id="u",
        check_type="c",
        intent="i",
        scheduled_at=NOW + timedelta(hours=1),
        created_at=NOW,
    ).model_dump()


def _record(project: str, key: str) -> dict[str, Any]:
    return idempotency_row(
        project,
        "POST /api/v1/agents/a/wakeups",
        key,
        "digest",
        status_code=201,
        body="{}",
        now=NOW,
        ttl=timedelta(hours=24),
    )


async def _count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def test_a_write_built_for_another_offset_writes_nothing(engine: AsyncEngine) -> None:
    """
    Built for a pair without offset, the wakeup is refused once the pair has one
    (row and key record both absent, the offset returned); built for that offset,
    it is written; a pair whose offset is 0 counts as not advanced.
    """
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id
    pair = Pair(project, "a", "u")
    async with engine.begin() as conn:
        await conn.execute(
            OFFSETS.insert().values(
                project_id=project, agent_id="a", user_id="u", offset_s=3600.0, updated_at=NOW
            )
        )

    refused = await store.wakeups.insert_wakeup(
        _wakeup(project, "wk_1"), record=_record(project, "k1"), expected=ExpectedOffset(pair)
    )

    assert (refused.written, refused.moved, refused.offset_s) == (False, True, 3600.0)
    assert refused.replay is None
    assert await _count(engine, WAKEUPS) == 0
    assert await _count(engine, IDEMPOTENCY) == 0

    written = await store.wakeups.insert_wakeup(
        _wakeup(project, "wk_1"),
        record=_record(project, "k1"),
        expected=ExpectedOffset(pair, 3600.0),
    )
    assert (written.written, written.moved) == (True, False)
    assert await _count(engine, WAKEUPS) == 1
    assert await _count(engine, IDEMPOTENCY) == 1

    # Another user of the agent has no offset: a write expecting none goes through.
    other = await store.wakeups.insert_wakeup(
        {**_wakeup(project, "wk_2"), "user_id": "v"},
        expected=ExpectedOffset(Pair(project, "a", "v"), 0.0),
    )
    assert other.written


async def test_a_schedule_built_for_another_offset_writes_nothing(engine: AsyncEngine) -> None:
    """The schedule create's guard, as the wakeup's: nothing of the schedule is written."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", NOW)).id
    async with engine.begin() as conn:
        await conn.execute(
            OFFSETS.insert().values(
                project_id=project, agent_id="a", user_id="u", offset_s=60.0, updated_at=NOW
            )
        )
    row = {
        "id": "sch_1",
        "project_id": project,
        "agent_id": "a",
        "user_id": "u",
        "cadence_type": "simple",
        "cadence_json": "{}",
        "timezone": "UTC",
        "active_window_json": None,
        "intent": "i",
        "check_type": "c",
        "inventory_item_id": None,
        "metadata_json": None,
        "starts_at": None,
        "ends_at": None,
        "anchor_at": NOW,
        "enabled": True,
        "next_fire_at": NOW + timedelta(hours=1),
        "due_at": None,
        "last_fire_at": None,
        "staged_fire_at": None,
        "claimed_by": None,
        "claimed_until": None,
        "version": 1,
        "created_at": NOW,
        "updated_at": NOW,
        "policy_json": None,
    }

    refused = await store.schedules.insert_schedule(
        row, expected=ExpectedOffset(Pair(project, "a", "u"))
    )

    assert (refused.written, refused.moved, refused.offset_s) == (False, True, 60.0)
    assert await _count(engine, SCHEDULES) == 0
    stored = await store.schedules.insert_schedule(row)
    assert stored.written
    got = await store.schedules.get_schedule(project, "a", "u", "sch_1")
    assert got is not None
    assert got.model_dump() == row
