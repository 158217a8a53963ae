"""
The relay's store keeps its contract on both databases and in both forms: a batch
holds the due unsent rows in order, its stamps commit only with the batch, prune
removes only old sent rows, and on PostgreSQL two relays never hold the same row.
"""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.outbox import OUTBOX, OutboxStore
from tests.daemon.helpers import count, rows

T = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


def message(i: int, available_at: datetime, sent_at: datetime | None = None) -> dict[str, object]:
    return {
        "subject": "test.fire.created",
        "msg_id": f"m{i}",
        "payload": "{}",
        "created_at": available_at,
        "available_at": available_at,
        "sent_at": sent_at,
    }


async def add(engine: AsyncEngine, messages: list[dict[str, object]]) -> None:
    async with engine.begin() as conn:
        await conn.execute(OUTBOX.insert(), messages)


async def unsent(engine: AsyncEngine) -> list[str]:
    stmt = select(OUTBOX.c.msg_id).where(OUTBOX.c.sent_at.is_(None)).order_by(OUTBOX.c.msg_id)
    return [r.msg_id for r in await rows(engine, stmt)]


async def test_a_batch_holds_due_unsent_rows_and_stamps_them_when_it_ends(engine, capabilities):
    """Due unsent rows come in (available_at, id) order; stamps commit at the end, not on error."""
    await add(
        engine,
        [
            message(1, T + timedelta(seconds=2)),
            message(2, T),
            message(3, T + timedelta(seconds=1)),
            message(4, T + timedelta(minutes=5)),  # not available yet
            message(5, T - timedelta(seconds=1), sent_at=T),  # sent already
        ],
    )
    store = OutboxStore(engine, capabilities=capabilities)
    now = T + timedelta(seconds=10)

    async def crash_after_the_acks() -> None:
        async with store.unsent(now, 2) as batch:
            assert [r.msg_id for r in batch.rows] == ["m2", "m3"]
            batch.mark_sent([r.id for r in batch.rows], now)
            raise RuntimeError("crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        await crash_after_the_acks()
    assert await unsent(engine) == ["m1", "m2", "m3", "m4"]

    async with store.unsent(now, 2) as batch:
        batch.mark_sent([batch.rows[0].id], now)
        assert await unsent(engine) == ["m1", "m2", "m3", "m4"]
    assert await unsent(engine) == ["m1", "m3", "m4"]
    [stamped] = await rows(engine, select(OUTBOX.c.sent_at).where(OUTBOX.c.msg_id == "m2"))
    assert stamped.sent_at == now

    async with store.unsent(now, 10) as batch:
        assert [r.msg_id for r in batch.rows] == ["m3", "m1"]


async def test_prune_deletes_only_rows_sent_before_the_cutoff(engine, capabilities):
    """Rows sent before the cutoff go; rows sent after it and unsent rows stay."""
    old = T - timedelta(days=8)
    await add(
        engine,
        [
            message(1, old, sent_at=old),
            message(2, old, sent_at=T),
            message(3, old),
        ],
    )
    store = OutboxStore(engine, capabilities=capabilities)
    assert await store.prune(T - timedelta(days=7)) == 1
    left = await rows(engine, select(OUTBOX.c.msg_id).order_by(OUTBOX.c.msg_id))
    assert [r.msg_id for r in left] == ["m2", "m3"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_two_relays_holding_batches_at_once_get_different_rows(engine, database_url):
    """A second relay's batch skips the rows the first one holds (FOR UPDATE SKIP LOCKED)."""
    await add(engine, [message(i, T + timedelta(seconds=i)) for i in range(5)])
    first, second = OutboxStore(engine), OutboxStore(engine)
    async with first.unsent(T + timedelta(minutes=1), 3) as held:
        async with second.unsent(T + timedelta(minutes=1), 10) as other:
            assert [r.msg_id for r in held.rows] == ["m0", "m1", "m2"]
            assert [r.msg_id for r in other.rows] == ["m3", "m4"]
            other.mark_sent([r.id for r in other.rows], T)
        held.mark_sent([r.id for r in held.rows], T)
    assert await count(engine, OUTBOX, OUTBOX.c.sent_at.is_(None)) == 0
