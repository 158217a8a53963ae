"""Bulk inserts skip duplicates and report exactly how many rows were new, on both databases."""

from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.bulk import OUTBOX, insert_outbox

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def _row(msg_id: str) -> dict[str, object]:
    return {"subject": "s", "msg_id": msg_id, "payload": "{}", "created_at": NOW}


async def test_many_rows_count_only_the_new_ones(engine: AsyncEngine) -> None:
    """Three rows, one already present and one repeated in the batch: two are new."""
    async with engine.begin() as conn:
        assert await insert_outbox(conn, [_row("a")]) == 1
    async with engine.begin() as conn:
        assert await insert_outbox(conn, [_row("a"), _row("b"), _row("c"), _row("b")]) == 2
    async with engine.connect() as conn:
        total = (await conn.execute(select(func.count()).select_from(OUTBOX))).scalar_one()
    assert total == 3


async def test_empty_batch_is_a_no_op(engine: AsyncEngine) -> None:
    """No rows, no statement, zero inserted."""
    async with engine.begin() as conn:
        assert await insert_outbox(conn, []) == 0
