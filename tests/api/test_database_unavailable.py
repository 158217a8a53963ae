"""A database connection lost under a request is a 503 that records nothing, not a 500."""

from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.bus.subjects import DEFAULT_SUBJECT_PREFIX, Subjects
from delivery.planning import Skip
from delivery.settings import Settings
from delivery.store.creates import ExpectedOffset, row_values
from delivery.store.idempotency import Recorded
from delivery.store.schedules import ScheduleStore
from delivery.store.sql import SqlStore
from delivery.store.tables import IDEMPOTENCY, SCHEDULES, ScheduleRow
from tests.api.conftest import Api

PATH = "/api/v1/agents/a1/users/u1/schedules"
BODY = {
    "cadence": {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"},
    "intent": "check in",
    "check_type": "reminder",
}


class _BackendKilledSchedules(ScheduleStore):
    """Its first insert runs after PostgreSQL terminated the connection's backend."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Subjects(DEFAULT_SUBJECT_PREFIX))
        self.killed = False

    async def insert_schedule(
        self,
        row: ScheduleRow | Mapping[str, Any],
        skips: Sequence[Skip] = (),
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        if not self.killed:
            self.killed = True
            async with self.write() as conn:
                # The server ends this very session, as a failover or an operator would.
                await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
                await conn.execute(SCHEDULES.insert().values(**row_values(row)))
        return await super().insert_schedule(row, skips, record=record, expected=expected)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_terminated_backend_answers_503_and_the_retry_creates_once(api: Api) -> None:
    store = SqlStore(api.store.engine)
    store.schedules = _BackendKilledSchedules(api.store.engine)
    app = create_app(Settings(subject_prefix="test"), store, api.clock)
    headers = {**api.alpha.headers, "Idempotency-Key": "failover"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://api.test",
        headers=headers,
    ) as client:
        lost = await client.post(PATH, json=BODY)
        assert (lost.status_code, lost.json()["code"]) == (503, "DATABASE_UNAVAILABLE")
        assert lost.headers["retry-after"] == "1"
        assert await api.store.count(SCHEDULES) == 0
        assert await api.store.count(IDEMPOTENCY) == 0
        retried = await client.post(PATH, json=BODY)
    assert retried.status_code == 201, retried.text
    assert await api.store.count(SCHEDULES) == 1
