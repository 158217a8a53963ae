"""
Schedule PATCH semantics and the waker hook: absent is unchanged,
``{}`` / ``""`` clear, timing changes recompute ``next_fire_at`` from now and wake the
daemon, other changes do not.
"""

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.bus.subjects import Subjects
from delivery.scheduler import Scheduler
from delivery.settings import Settings
from delivery.store.bulk import OUTBOX
from delivery.store.tables import FIRES, SCHEDULES
from tests.api.conftest import START, Api

PATH = "/api/v1/agents/a1/users/u1/schedules"
DAILY = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}


class RecordingWaker:
    """Counts wake() calls."""

    def __init__(self) -> None:
        self.calls = 0

    def wake(self) -> None:
        self.calls += 1


@pytest.fixture
async def woken(api: Api) -> AsyncIterator[tuple[httpx.AsyncClient, RecordingWaker]]:
    """Alpha's client on an app whose waker records calls."""
    waker = RecordingWaker()
    app = create_app(Settings(subject_prefix="test"), api.store, api.clock, waker)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://api.test",
        headers=api.alpha.headers,
    ) as client:
        yield client, waker


async def test_patch_semantics_and_wakes(
    api: Api, woken: tuple[httpx.AsyncClient, RecordingWaker]
) -> None:
    """
    Each PATCH form does what the API documents; only timing changes, new
    wakeups and accepted events wake the daemon.
    """
    client, waker = woken
    item = (
        await client.post("/api/v1/agents/a1/users/u1/inventory/items", json={"item_type": "m"})
    ).json()
    created = await client.post(
        PATH,
        json={
            "cadence": DAILY,
            "intent": "i",
            "check_type": "c",
            "active_window": {"days_of_week": ["mon"]},
            "metadata": {"k": "v"},
            "starts_at": "2026-05-02T00:00:00Z",
            "ends_at": "2026-06-01T00:00:00Z",
        },
    )
    assert created.status_code == 201
    assert created.json()["next_fire_at"] == "2026-05-04T09:00:00Z"  # the first Monday
    one = f"{PATH}/{created.json()['schedule_id']}"
    assert waker.calls == 1

    same = (await client.patch(one, json={})).json()
    assert same == (await client.get(one)).json()
    async with api.store.read() as conn:
        version = (await conn.execute(SCHEDULES.select())).one().version
    assert version == 1

    renamed = (
        await client.patch(one, json={"intent": "new", "inventory_item_id": item["fact_id"]})
    ).json()
    assert (renamed["intent"], renamed["inventory_item_id"]) == ("new", item["fact_id"])
    assert renamed["next_fire_at"] == "2026-05-04T09:00:00Z"
    assert waker.calls == 1

    cleared = (
        await client.patch(
            one,
            json={"active_window": {}, "metadata": {}, "starts_at": "", "inventory_item_id": ""},
        )
    ).json()
    for gone in ("active_window", "metadata", "starts_at", "inventory_item_id"):
        assert gone not in cleared, gone
    assert cleared["ends_at"] == "2026-06-01T00:00:00Z"
    assert cleared["next_fire_at"] == "2026-05-01T09:00:00Z"  # recomputed from now
    assert waker.calls == 2

    api.clock.advance(timedelta(hours=10))
    moved = (await client.patch(one, json={"cadence": {**DAILY, "timezone": "Asia/Tokyo"}})).json()
    assert moved["timezone"] == "Asia/Tokyo"
    assert moved["next_fire_at"] == "2026-05-02T00:00:00Z"  # 09:00 JST on the 2nd
    assert waker.calls == 3

    unknown_item = await client.patch(one, json={"inventory_item_id": "inv_nope"})
    assert unknown_item.status_code == 404
    async with api.store.read() as conn:
        row = (await conn.execute(SCHEDULES.select())).one()
    assert row.version == 4
    assert row.inventory_item_id is None

    # A new wakeup and an accepted event may be due at once, so both wake; reads do not.
    await client.post(
        "/api/v1/agents/a1/wakeups",
        json={"user_id": "u1", "check_type": "c", "intent": "i", "delay_hours": 0},
    )
    await client.post("/api/v1/agents/a1/events", json={"user_id": "u1", "event_type": "e"})
    await client.get("/api/v1/agents/a1/wakeups")
    assert waker.calls == 5


async def test_a_timing_change_drops_the_fire_staged_under_the_old_timing(api: Api) -> None:
    """
    A fire the scheduler staged (lookahead) is the wire ``next_fire_at`` until its
    instant; an edit that keeps the timing keeps it (and restages it), a timing
    change or a delete removes it with its unpublished outbox entry, so the old
    timing never fires.
    """
    engine = api.store.engine
    made = [
        (await api.alpha.post(PATH, json={"cadence": DAILY, "intent": "i", "check_type": "c"}))
        for _ in range(2)
    ]
    keep, gone = (f"{PATH}/{r.json()['schedule_id']}" for r in made)
    nine = START.replace(hour=9)
    api.clock.set(nine - timedelta(seconds=20))
    scheduler = Scheduler(engine, Subjects("test"), lookahead=timedelta(seconds=30))
    assert (await scheduler.drain(api.clock.now())).fired == 2
    assert await _count(engine, OUTBOX, OUTBOX.c.sent_at.is_(None)) == 2

    staged = (await api.alpha.get(keep)).json()
    assert staged["next_fire_at"] == "2026-05-01T09:00:00Z"  # the row itself is at the 2nd
    renamed = (await api.alpha.patch(keep, json={"intent": "new"})).json()
    assert renamed["next_fire_at"] == "2026-05-01T09:00:00Z"
    assert await _count(engine, FIRES) == 2

    keep_id = made[0].json()["schedule_id"]
    # A fire advance-time made in the simulated future (written at its own instant)
    # is history, not a staged fire: a timing change keeps it.
    simulated = START.replace(day=3, hour=9)
    async with engine.begin() as conn:
        await conn.execute(
            FIRES.insert().values(
                id="fire_simulated",
                schedule_id=keep_id,
                project_id=api.projects["alpha"],
                agent_id="a1",
                user_id="u1",
                fire_at=simulated,
                status="fired",
                created_at=simulated,
            )
        )
    moved = (
        await api.alpha.patch(
            keep,
            json={"cadence": {**DAILY, "simple": {"frequency": "daily", "times": ["10:00"]}}},
        )
    ).json()
    assert moved["next_fire_at"] == "2026-05-01T10:00:00Z"
    assert (await api.alpha.get(keep)).json()["next_fire_at"] == "2026-05-01T10:00:00Z"
    async with engine.connect() as conn:
        left = await conn.execute(select(FIRES.c.id).where(FIRES.c.schedule_id == keep_id))
        row = (await conn.execute(SCHEDULES.select().where(SCHEDULES.c.id == keep_id))).one()
    assert left.scalars().all() == ["fire_simulated"]
    assert (row.last_fire_at, row.staged_fire_at) == (simulated, None)

    assert (await api.alpha.delete(gone)).status_code == 200
    assert await _count(engine, FIRES) == 1
    # The staged fires' own entries are gone unpublished. Each write (rename,
    # move, delete) queued one restage message instead, so the dispatcher drops
    # or recomposes whatever it may have composed from the old state.
    restage = OUTBOX.c.msg_id.like("%:restage:%")
    assert await _count(engine, OUTBOX, ~restage) == 0
    assert await _count(engine, OUTBOX, restage) == 3


async def _count(engine: AsyncEngine, table: Table, *where: Any) -> int:
    async with engine.connect() as conn:
        stmt = select(func.count()).select_from(table).where(*where)
        return int((await conn.execute(stmt)).scalar_one())
