"""Row factories for dispatcher and workbench tests: Core inserts with sensible defaults."""

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.planning import fire_id
from delivery.store.tables import (
    FireRow,
    InventoryItemRow,
    NotificationRow,
    OutboxRow,
    ProjectRow,
    ScheduleRow,
    TriggerEventRow,
    WakeupRow,
)

T0 = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)


def table(model: Any) -> Table:
    return model.__table__  # type: ignore[no-any-return]


async def insert(engine: AsyncEngine, model: Any, **values: Any) -> dict[str, Any]:
    async with engine.begin() as conn:
        await conn.execute(table(model).insert().values(**values))
    return values


async def project(engine: AsyncEngine, pid: str = "proj_1") -> str:
    await insert(engine, ProjectRow, id=pid, name=pid, created_at=T0)
    return pid


async def schedule(engine: AsyncEngine, sid: str = "sch_1", **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": sid,
        "project_id": "proj_1",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "cadence_type": "simple",
        "cadence_json": json.dumps(
            {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "Asia/Singapore"}
        ),
        "timezone": "Asia/Singapore",
        "intent": "check in on how the user is feeling",
        "check_type": "reminder",
        "anchor_at": T0,
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(over)
    return await insert(engine, ScheduleRow, **values)


async def fire(
    engine: AsyncEngine,
    schedule_id: str,
    fire_at: datetime,
    status: str = "fired",
    created_at: datetime | None = None,
) -> str:
    """A fire row; ``created_at`` before ``fire_at`` makes it one the lookahead staged."""
    fid = fire_id(schedule_id, fire_at)
    await insert(
        engine,
        FireRow,
        id=fid,
        schedule_id=schedule_id,
        project_id="proj_1",
        agent_id="agent_1",
        user_id="user_1",
        fire_at=fire_at,
        status=status,
        created_at=fire_at if created_at is None else created_at,
    )
    return fid


async def wakeup(engine: AsyncEngine, wid: str = "wk_1", **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": wid,
        "project_id": "proj_1",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "check_type": "birthday",
        "intent": "wish the user a happy birthday",
        "scheduled_at": datetime(2026, 6, 15, 9, tzinfo=UTC),
        "created_at": T0,
    }
    values.update(over)
    return await insert(engine, WakeupRow, **values)


async def event(engine: AsyncEngine, eid: str = "evt_1", **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": eid,
        "project_id": "proj_1",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "event_type": "level_up",
        "event_description": "The user just reached level 25 — a major milestone in the game.",
        "metadata_json": json.dumps({"new_level": "25", "previous_level": "24"}),
        "created_at": datetime(2026, 5, 2, 10, 30, tzinfo=UTC),
    }
    values.update(over)
    return await insert(engine, TriggerEventRow, **values)


async def item(engine: AsyncEngine, iid: str = "inv_1", **over: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "id": iid,
        "project_id": "proj_1",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "item_type": "medication",
        "label": "Daily Vitamin D",
        "properties_json": json.dumps(
            {"dosage": "1000 IU", "form": "softgel", "timing_notes": "take with food"},
            sort_keys=True,
        ),
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(over)
    return await insert(engine, InventoryItemRow, **values)


async def notifications(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        t = table(NotificationRow)
        rows = await conn.execute(select(t).order_by(t.c.fire_at, t.c.id))
        return [dict(r) for r in rows.mappings()]


async def outbox(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        t = table(OutboxRow)
        rows = await conn.execute(select(t).order_by(t.c.id))
        return [dict(r) for r in rows.mappings()]


async def count(engine: AsyncEngine, model: Any) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(table(model)))).scalar_one()
        )


async def row(engine: AsyncEngine, model: Any, rid: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        t = table(model)
        return dict((await conn.execute(select(t).where(t.c.id == rid))).mappings().one())


async def row_where(engine: AsyncEngine, model: Any, **where: Any) -> dict[str, Any]:
    async with engine.connect() as conn:
        t = table(model)
        stmt = select(t).where(*(t.c[k] == v for k, v in where.items()))
        return dict((await conn.execute(stmt)).mappings().one())
