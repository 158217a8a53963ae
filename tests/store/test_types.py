"""Column types behave the same on both databases."""

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.tables import ProjectRow


async def test_instants_round_trip_as_aware_utc(engine: AsyncEngine) -> None:
    """An aware instant in any offset comes back as the same instant in UTC."""
    at = datetime(2026, 3, 8, 2, 30, 0, 123456, tzinfo=timezone(timedelta(hours=-5)))
    async with engine.begin() as conn:
        await conn.execute(ProjectRow.__table__.insert().values(id="p1", name="n", created_at=at))  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        got = (await conn.execute(select(ProjectRow.__table__.c.created_at))).scalar_one()  # type: ignore[attr-defined]
    assert got.tzinfo is not None
    assert got.utcoffset() == timedelta(0)
    assert got == at
    assert got.astimezone(UTC).isoformat() == "2026-03-08T07:30:00.123456+00:00"


async def test_naive_instant_is_refused(engine: AsyncEngine) -> None:
    """Writing a naive datetime is a bug and raises instead of guessing a zone."""
    naive = datetime(2026, 1, 1)  # noqa: DTZ001 - the point of the test
    insert = ProjectRow.__table__.insert().values(id="p1", name="n", created_at=naive)  # type: ignore[attr-defined]
    async with engine.begin() as conn:
        with pytest.raises(StatementError, match="naive"):
            await conn.execute(insert)
