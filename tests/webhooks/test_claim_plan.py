"""
The fair claim reads the index, not the table rows of endpoints at their cap.

Every statement :meth:`WebhookStore.claim_due` runs is captured and planned again with
the same parameters: on PostgreSQL ``EXPLAIN (ANALYZE, FORMAT JSON)`` (in a transaction
rolled back), on SQLite ``EXPLAIN QUERY PLAN``.
"""

import json
import sqlite3
from contextlib import closing
from datetime import timedelta
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url

from delivery.store.direct import sqlite_instant
from delivery.store.webhooks import _sqlite_due
from tests.handlers.webhooks.stub import Reply
from tests.webhooks.conftest import Rig

EVENT = "on_wakeup_ready"


class _Recording:
    """A ``sqlite3`` connection that remembers the statements run through it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.seen: list[tuple[str, Any]] = []

    def execute(self, sql: str, params: Any) -> sqlite3.Cursor:
        self.seen.append((sql, params))
        return self.db.execute(sql, params)


def _sqlite_plans(rig: Rig, capped: str) -> None:
    path = make_url(str(rig.engine.url)).database
    assert path is not None
    with closing(sqlite3.connect(path)) as db:
        recording = _Recording(db)
        stamp = sqlite_instant(rig.clock.now())
        assert _sqlite_due(recording, now=stamp, full=[capped], limit=32) == []  # type: ignore[arg-type]
        assert recording.seen
        for statement, params in recording.seen:
            rows = db.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
            plan = " / ".join(str(r[-1]) for r in rows)
            # The NOT IN is read from the due index's entries (endpoint_id is in it).
            assert "USING INDEX ix_webhook_deliveries_due" in plan, plan


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


async def test_a_claim_with_every_endpoint_at_its_cap_reads_no_delivery_row(rig: Rig) -> None:
    """
    The one endpoint with due rows is at its cap (another is registered with none):
    the claim returns nothing, and no statement it runs reads a delivery's table row
    only to reject it (PostgreSQL checked a ``NOT IN`` on the endpoint per table
    row: every due row was read).
    """
    _, url = rig.receiver(Reply(200))
    await rig.register(url)
    await rig.register(url, project="beta")
    worker = rig.worker()
    assert await worker.enqueue(await rig.notify(*range(1, 13))) == 12
    first = await rig.claim(12)
    alpha = first[0].endpoint_id
    # Released again: due again, all of them alpha's.
    await rig.webhooks.release_claims(now=rig.clock.now())
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, params))

    sync_engine = rig.engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", capture)
    try:
        claimed = await rig.claim(8, per_endpoint=2, in_flight={alpha: 2})
    finally:
        event.remove(sync_engine, "before_cursor_execute", capture)
    assert claimed == []
    if rig.engine.dialect.name == "sqlite":
        # SQLite's claim runs its statements on the driver's thread, past SQLAlchemy:
        # its due read is planned on a connection of its own.
        _sqlite_plans(rig, alpha)
        return
    reads = [(s, p) for s, p in seen if "webhook_deliveries" in s and "SELECT" in s.upper()]
    assert reads, seen
    async with rig.engine.connect() as conn:
        for statement, params in reads:
            async with conn.begin():
                raw = (
                    await conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params
                    )
                ).scalar_one()
                await conn.rollback()
            plan = (json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]
            for node in _nodes(plan):
                if node.get("Relation Name") != "webhook_deliveries":
                    continue
                assert node.get("Rows Removed by Filter", 0) == 0, node
                assert "endpoint_id" not in node.get("Filter", ""), node
                if node["Node Type"] in ("Index Scan", "Bitmap Heap Scan", "Seq Scan"):
                    # Table rows: none of the capped endpoint's.
                    assert node["Actual Rows"] * node["Actual Loops"] == 0, node


async def test_a_claim_locks_only_the_rows_it_takes(rig: Rig) -> None:
    """
    Two endpoints with backlogs and room for 3 each, a claim of 3: the 3 oldest due are
    taken, and on PostgreSQL only they are locked while the claim's transaction is open
    (another transaction can lock every other pending row), however many endpoints were
    probed. On SQLite, one writer, the claim takes the same 3.
    """
    await rig.backlogs(5, 5)
    rig.clock.advance(timedelta(seconds=1))
    if rig.engine.dialect.name == "sqlite":
        claimed = await rig.claim(3, per_endpoint=3, in_flight={})
        assert [c.project_id for c in claimed] == [rig.projects["alpha"]] * 3
        return
    lockable = text(
        "SELECT id FROM webhook_deliveries WHERE status = 'pending' FOR UPDATE SKIP LOCKED"
    )
    async with rig.engine.connect() as conn:
        pending = set((await conn.execute(lockable)).scalars())
        await conn.rollback()
        assert len(pending) == 10
        ids = await rig.webhooks._claim_per_endpoint(
            conn, now=rig.clock.now(), limit=3, per_endpoint=3, in_flight={}
        )
        assert len(ids) == 3
        async with rig.engine.connect() as other:
            free = set((await other.execute(lockable)).scalars())
            await other.rollback()
        await conn.rollback()
    assert free == pending - set(ids)
