"""
Composing a burst ahead of its instant, without showing anything early.

The scheduler's lookahead stages a fire up to a minute before it is due and
publishes it at once. The dispatcher composes it straight away into a
notification with status :data:`STAGED`, which no read shows (queue, history,
project view, consume, acknowledge, stream). At the fire instant the outbox relay
promotes every due staged row with one statement (:func:`promote`), and the
row's ``notification.created`` entry, which was written with ``available_at`` at
the fire instant, goes out right after. A burst's work at its instant is then
one UPDATE instead of composing and inserting every message.

The message must still show the schedule and its inventory item as they are at
the fire instant (the Sonzai docs' "live properties read at fire time"). So every API
write that could change it (schedule PATCH or DELETE, item update or delete)
calls :func:`restage_fires` in its own transaction for the schedule's fires
that are staged and not yet due: their staged notifications and unsent outbox
entries are deleted and a restage message is queued. The dispatcher composes
those fires again from the new state (or finds them gone), replacing a staged
row that a dispatcher racing the write may have written from the old state.
"""

import secrets
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import Select, case, literal, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.bus.messages import FireCreated
from delivery.bus.subjects import Subjects
from delivery.domain import notification_id
from delivery.store.bulk import insert_outbox
from delivery.store.engine import any_row, write_transaction
from delivery.store.steps import DeleteIn, Steps, run_core
from delivery.store.tables import FIRES, NOTIFICATIONS, OUTBOX

STAGED = "staged"
"""The status of a notification composed ahead of its fire instant; hidden from reads."""

log = structlog.get_logger(__name__)


def _due(now: datetime) -> tuple[Any, ...]:
    n = NOTIFICATIONS.c
    return (n.status == STAGED, n.fire_at <= now)


async def promote(engine: AsyncEngine, now: datetime) -> int:
    """
    Make every staged notification whose fire instant has passed visible.

    ``created_at`` becomes ``now``: the instant it joined the queue, which is
    what lateness is measured on. A message of an advanced pair held for later
    keeps its ``created_at``: the pair's instant it was held until, later than its
    ``fire_at`` (the same instant in real time, which released it; see
    :func:`delivery.dispatcher.process.notification_row`), as real now is not on
    the pair's clock, and its ``fire_at`` becomes that instant too. A staged row
    whose composition failed becomes ``failed_generation`` (it has no outbox
    entry: nothing to deliver).
    Idempotent, so every relay of every replica may run it.

    Returns:
        Notifications promoted.
    """
    n = NOTIFICATIONS.c
    # Probe first: on SQLite a write transaction queues for the one writer even
    # when it would change nothing, and the relay runs this on every pass.
    if not await any_row(engine, select(n.id).where(*_due(now))):
        return 0
    stmt = (
        update(NOTIFICATIONS)
        .where(*_due(now))
        .values(
            status=case((n.error.is_(None), "pending"), else_="failed_generation"),
            created_at=case(
                (n.created_at > n.fire_at, n.created_at),
                else_=literal(now, n.created_at.type),
            ),
            # Released, such a message is dated on its pair's clock again throughout.
            fire_at=case((n.created_at > n.fire_at, n.created_at), else_=n.fire_at),
        )
    )
    async with write_transaction(engine) as conn:
        promoted = int((await conn.execute(stmt)).rowcount or 0)
    if promoted:
        log.info("notifications_promoted", promoted=promoted)
    return promoted


def dropping_staged(source_ids: Sequence[str]) -> Steps[None]:
    """
    Delete the ``staged`` notifications of ``source_ids`` and their unsent
    ``notification.created`` entries (msg id = notification id). Visible
    notifications are never touched.
    """
    ids = sorted({notification_id(source_id) for source_id in source_ids})
    if not ids:
        return
    yield DeleteIn(NOTIFICATIONS, "id", ids, {"status": STAGED})
    yield DeleteIn(OUTBOX, "msg_id", ids, {"sent_at": None})


async def drop_staged(conn: AsyncConnection, source_ids: Sequence[str]) -> None:
    """:func:`dropping_staged` inside the caller's transaction."""
    await run_core(dropping_staged(source_ids), conn)


def staged_fires(now: datetime) -> Select[Any]:
    """
    Fires staged ahead (written before their instant) that are not due at ``now``.

    The caller adds the conditions naming whose fires. Advance-time fires also lie
    ahead of real time but are written at their simulated instant, so
    ``created_at < fire_at`` leaves them out: their notifications are final.
    """
    f = FIRES.c
    return select(f.id, f.schedule_id, f.fire_at).where(
        f.status == "fired", f.created_at < f.fire_at, f.fire_at > now
    )


async def restage_fires(
    conn: AsyncConnection, query: Select[Any], *, subjects: Subjects, now: datetime
) -> int:
    """
    Inside the caller's write transaction: have the fires ``query`` selects composed again.

    Each fire's staged notification and unsent ``notification.created`` entry
    are deleted, and a ``fire.created`` message flagged ``restage`` is queued
    under its own ``Nats-Msg-Id`` (the fire id's own message may already sit
    in JetStream's duplicate window). A fire the same transaction deletes later
    is harmless: the dispatcher then finds it gone and drops any staged row a
    racing dispatcher left for it.

    Args:
        query: from :func:`staged_fires`, narrowed to the schedules concerned.

    Returns:
        Fires restaged.
    """
    fires: Sequence[Any] = (await conn.execute(query)).all()
    if not fires:
        return 0
    await drop_staged(conn, [f.id for f in fires])
    token = secrets.token_hex(4)
    await insert_outbox(
        conn,
        [
            {
                "subject": subjects.fire_created,
                "msg_id": f"{f.id}:restage:{token}",
                "payload": FireCreated(
                    fire_id=f.id, schedule_id=f.schedule_id, fire_at=f.fire_at, restage=True
                ).model_dump_json(),
                "created_at": now,
                "available_at": now,
            }
            for f in fires
        ],
    )
    for f in fires:
        log.info("fire_restaged", fire_id=f.id, schedule_id=f.schedule_id)
    return len(fires)
