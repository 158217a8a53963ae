"""The advance-time routes in-process (ASGITransport): bad input and tenancy, both databases."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.clock import ManualClock
from delivery.settings import Settings
from delivery.store.advance import OFFSETS
from delivery.store.sql import SqlStore

START = datetime(2026, 5, 1, tzinfo=UTC)
BODY = {
    "simulated_hours": 1.0,
    "simulated_base_offset_hours": 0.0,
    "character_config": {},
    "instance_id": "",
    "agent_id": "agent-1",
    "user_id": "user-1",
}


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[tuple[httpx.AsyncClient, ManualClock]]:
    """A client with a valid key over the app, and the app's clock."""
    clock = ManualClock(START)
    store = SqlStore(engine)
    project = await store.keys.ensure_project("alpha", START)
    key = await store.keys.create_api_key(project.id, START)
    app = create_app(Settings(subject_prefix="wbt"), store, clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://api.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as http:
        yield http, clock


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"simulated_hours": "48"}, "simulated_hours"),
        ({"simulated_hours": -1}, "simulated_hours"),
        ({"agent_id": "a/b"}, "agent_id"),
        ({"user_id": None}, "user_id"),
        ({"surprise": 1}, "surprise"),
    ],
    ids=["string-hours", "negative-hours", "bad-agent-id", "null-user", "unknown-key"],
)
async def test_bad_advance_is_400_naming_the_field(
    client: tuple[httpx.AsyncClient, ManualClock], change: dict[str, object], field: str
) -> None:
    """Bad input answers 400 with a code and the field, and moves no clock."""
    http, _ = client
    response = await http.post("/api/v1/workbench/advance-time", json={**BODY, **change})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] in ("INVALID_REQUEST", "INVALID_ID")
    assert body["errors"][0]["field"] == field


async def test_job_expires_after_thirty_minutes(
    client: tuple[httpx.AsyncClient, ManualClock],
) -> None:
    """A job is pollable for 30 minutes; after that its id answers 404 like an unknown one."""
    http, clock = client
    started = await http.post("/api/v1/workbench/advance-time", json={**BODY, "async": True})
    assert started.status_code == 202
    job_id = started.json()["job_id"]
    for _ in range(200):  # let the background run finish before the test ends
        polled = await http.get(f"/api/v1/workbench/advance-time/jobs/{job_id}")
        assert polled.status_code == 200
        if polled.json()["status"] != "running":
            break
        await asyncio.sleep(0.02)
    assert polled.json()["status"] == "succeeded"

    clock.advance(timedelta(minutes=31))

    gone = await http.get(f"/api/v1/workbench/advance-time/jobs/{job_id}")
    assert gone.status_code == 404
    assert gone.json()["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    "pair_now",
    [datetime(2199, 12, 31, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)],
    ids=["just-before-2200", "near-year-9999"],
)
async def test_advance_past_the_latest_instant_is_400(
    client: tuple[httpx.AsyncClient, ManualClock], engine: AsyncEngine, pair_now: datetime
) -> None:
    """
    An advance that would move a pair's simulated clock to 2200-01-01T00:00Z or later
    (where datetime arithmetic heads for year 9999) is 400 on simulated_hours, not a
    500, and leaves the clock where it was.
    """
    http, _ = client
    project = await SqlStore(engine).keys.ensure_project("alpha", START)
    offset_s = (pair_now - START).total_seconds()
    key = {"project_id": project.id, "agent_id": BODY["agent_id"], "user_id": BODY["user_id"]}
    async with engine.begin() as conn:
        await conn.execute(OFFSETS.insert().values(**key, offset_s=offset_s, updated_at=START))
    response = await http.post(
        "/api/v1/workbench/advance-time", json={**BODY, "simulated_hours": 48}
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "INVALID_REQUEST"
    assert body["errors"][0]["field"] == "simulated_hours"
    assert "2200-01-01T00:00:00Z" in body["message"]
    async with engine.connect() as conn:
        stored = (await conn.execute(select(OFFSETS.c.offset_s))).scalar_one()
    assert stored == offset_s
