"""
Moving a pair's clock re-dates its held messages, but only while they are still held:
the relay may release one between the advance's read and its update (PostgreSQL takes
no row lock on the read), and the release's instant must then stay.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.dml import Update

from delivery.store.advance import Pair, _shift_held
from delivery.store.sql import SqlStore
from delivery.store.staging import STAGED
from delivery.store.tables import NOTIFICATIONS, OUTBOX

HELD_UNTIL = datetime(2026, 6, 1, 7, 30, tzinfo=UTC)
RELEASED_AT = datetime(2026, 6, 1, 7, 30, 2, tzinfo=UTC)


def _held(pair: Pair, nid: str) -> dict[str, Any]:
    return {
        "id": nid,
        "project_id": pair.project_id,
        "agent_id": pair.agent_id,
        "user_id": pair.user_id,
        "source_type": "wakeup",
        "source_id": f"wk_{nid}",
        "event_type": "on_wakeup_ready",
        "check_type": "c",
        "status": STAGED,
        "fire_at": HELD_UNTIL,
        "created_at": HELD_UNTIL - timedelta(hours=9),
    }


class _ReleasedMidway:
    """
    The advance's connection, with the relay's release of ``nid`` committed just
    before the advance's first update of a notification: the interleaving that a
    separate transaction produces on PostgreSQL, played on one connection so it is
    deterministic on both databases.
    """

    def __init__(self, conn: AsyncConnection, nid: str) -> None:
        self._conn = conn
        self._nid = nid
        self.released = False

    async def execute(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.released and isinstance(statement, Update) and statement.table is NOTIFICATIONS:
            self.released = True
            await self._conn.execute(
                update(NOTIFICATIONS)
                .where(NOTIFICATIONS.c.id == self._nid)
                .values(status="pending", fire_at=RELEASED_AT)
            )
            await self._conn.execute(
                update(OUTBOX).where(OUTBOX.c.msg_id == self._nid).values(sent_at=RELEASED_AT)
            )
        return await self._conn.execute(statement, *args, **kwargs)


async def test_a_message_released_after_the_read_keeps_its_release(engine: AsyncEngine) -> None:
    project = await SqlStore(engine).keys.ensure_project("p", HELD_UNTIL - timedelta(days=1))
    pair = Pair(project.id, "a", "u")
    async with engine.begin() as conn:
        await conn.execute(
            NOTIFICATIONS.insert(), [_held(pair, "msg_released"), _held(pair, "msg_held")]
        )
        await conn.execute(
            OUTBOX.insert(),
            [
                {
                    "subject": "delivery.notification.released",
                    "msg_id": nid,
                    "payload": "{}",
                    "created_at": HELD_UNTIL - timedelta(hours=9),
                    "available_at": HELD_UNTIL,
                }
                for nid in ("msg_released", "msg_held")
            ],
        )
    async with engine.begin() as conn:
        racing = _ReleasedMidway(conn, "msg_released")
        await _shift_held(racing, pair, timedelta(hours=2))  # type: ignore[arg-type]
        assert racing.released
    async with engine.connect() as conn:
        notes = dict(
            (await conn.execute(select(NOTIFICATIONS.c.id, NOTIFICATIONS.c.fire_at))).all()
        )
        outbox = dict((await conn.execute(select(OUTBOX.c.msg_id, OUTBOX.c.available_at))).all())
    # The released one keeps the relay's instant; the one still held moves with the clock.
    assert _utc(notes["msg_released"]) == RELEASED_AT
    assert _utc(outbox["msg_released"]) == HELD_UNTIL
    assert _utc(notes["msg_held"]) == HELD_UNTIL - timedelta(hours=2)
    assert _utc(outbox["msg_held"]) == HELD_UNTIL - timedelta(hours=2)


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)
