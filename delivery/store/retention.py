"""
Retention: delete recorded history older than a cutoff, one bounded batch at a time.

What goes, per table (each batch is one short transaction, found through an index on
its instant):

* ``fires`` with ``fire_at`` before the cutoff, unless their outbox entry is still
  unsent;
* ``schedule_changes`` with ``changed_at`` before it;
* ``webhook_attempts`` created before it (oldest ``seq`` first);
* ``channel_attempts`` created before it that are not a queued retry
  (``next_attempt_at`` set: that row *is* the durable retry queue entry);
* ``channel_fallbacks`` finished (delivered, exhausted or stopped) before it;
* ``notifications`` consumed (by a poll or a webhook 2xx) before it that no webhook
  delivery or channel retry still waits on.

What never goes: pending, staged, failed or expired notifications, wakeups, trigger
events, webhook deliveries, schedules, and anything younger than the cutoff.

Why pruning cannot make anything happen twice:

* A fire is unique on ``(schedule_id, fire_at)``, but that key is not what stops an
  old tick from firing again. The scheduler plans only ticks at or after a schedule's
  ``next_fire_at``, which only ever moves forward (``delivery.planning.plan_ticks``
  ignores earlier ticks), and never scans further back than ``max_lateness`` plus
  the skip horizon (``delivery.planning.scan_after``); a PATCH recomputes
  ``next_fire_at`` from now; advance-time windows start at the pair's simulated
  now, which only moves forward. The caller keeps the fire cutoff before all of
  these (:func:`fire_cutoff`).
* A notification is unique on its ``source_id``; a redelivered bus message for its
  source could make it again only while the message lives, and the stream keeps
  messages 7 days (``delivery.bus.stream.STREAM_MAX_AGE_S``), less than the shortest
  retention allowed. A fire's message also needs its fire row, a wakeup's a pending
  wakeup: both are gone or final long before.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Select, Table, delete, exists, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.planning import DEFAULT_SKIP_HORIZON
from delivery.store.engine import write_transaction
from delivery.store.tables import (
    CHANNEL_ATTEMPTS,
    CHANNEL_FALLBACKS,
    DELIVERIES,
    FIRES,
    NOTIFICATIONS,
    OUTBOX,
    SCHEDULE_CHANGES,
    WEBHOOK_ATTEMPTS,
)

PRUNED_TABLES = (
    "fires",
    "schedule_changes",
    "webhook_attempts",
    "channel_attempts",
    "channel_fallbacks",
    "notifications",
)
"""Every table retention prunes, in the order a pass visits them."""


def fire_cutoff(cutoff: datetime, now: datetime, max_lateness: timedelta) -> datetime:
    """
    The fire cutoff: ``cutoff``, or earlier when the scheduler may still look back
    further (a maximum lateness longer than the retention), plus a day of margin.
    """
    return min(cutoff, now - max_lateness - DEFAULT_SKIP_HORIZON - timedelta(days=1))


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """Rows older than these go: ``fires`` by :attr:`fires`, every other table by :attr:`rows`."""

    rows: datetime
    fires: datetime


class RetentionStore(Protocol):
    """
    Deletes expired history in bounded batches.

    Contract: :meth:`prune_batch` deletes at most ``batch`` rows of ``table`` (one of
    :data:`PRUNED_TABLES`) older than its cutoff, in one transaction, oldest first,
    never a row the module docstring keeps, and returns how many it deleted; a
    result below ``batch`` means nothing older is left. Safe to run concurrently
    (two replicas): a row is deleted once, the other sees it gone.
    """

    async def prune_batch(self, table: str, cutoffs: Cutoffs, batch: int) -> int:
        """Delete one batch of ``table``; how many rows went."""
        ...


class SqlRetentionStore:
    """:class:`RetentionStore` on SQLite or PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def prune_batch(self, table: str, cutoffs: Cutoffs, batch: int) -> int:
        target, key, chosen = self._batch(table, cutoffs, batch)
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(delete(target).where(key.in_(chosen.scalar_subquery())))
        return int(result.rowcount or 0)

    @staticmethod
    def _batch(
        table: str, cutoffs: Cutoffs, batch: int
    ) -> tuple[Table, ColumnElement[Any], Select[Any]]:
        before = cutoffs.rows
        if table == "fires":
            f = FIRES.c
            unsent = exists().where(OUTBOX.c.msg_id == f.id, OUTBOX.c.sent_at.is_(None))
            chosen = (
                select(f.id)
                .where(f.fire_at < cutoffs.fires, ~unsent)
                .order_by(f.fire_at)
                .limit(batch)
            )
            return FIRES, f.id, chosen
        if table == "schedule_changes":
            c = SCHEDULE_CHANGES.c
            chosen = select(c.id).where(c.changed_at < before).order_by(c.changed_at).limit(batch)
            return SCHEDULE_CHANGES, c.id, chosen
        if table == "webhook_attempts":
            a = WEBHOOK_ATTEMPTS.c
            # seq grows with time: the oldest rows are the first ones in key order.
            chosen = select(a.seq).where(a.created_at < before).order_by(a.seq).limit(batch)
            return WEBHOOK_ATTEMPTS, a.seq, chosen
        if table == "channel_attempts":
            ch = CHANNEL_ATTEMPTS.c
            chosen = (
                select(ch.id)
                .where(ch.created_at < before, ch.next_attempt_at.is_(None))
                .order_by(ch.created_at)
                .limit(batch)
            )
            return CHANNEL_ATTEMPTS, ch.id, chosen
        if table == "channel_fallbacks":
            fb = CHANNEL_FALLBACKS.c
            chosen = (
                select(fb.notification_id)
                .where(fb.updated_at < before, fb.next_attempt_at.is_(None))
                .order_by(fb.updated_at)
                .limit(batch)
            )
            return CHANNEL_FALLBACKS, fb.notification_id, chosen
        if table == "notifications":
            n = NOTIFICATIONS.c
            waiting_hook = exists().where(
                DELIVERIES.c.notification_id == n.id, DELIVERIES.c.status == "pending"
            )
            waiting_channel = exists().where(
                CHANNEL_ATTEMPTS.c.notification_id == n.id,
                CHANNEL_ATTEMPTS.c.next_attempt_at.is_not(None),
            )
            chosen = (
                select(n.id)
                .where(
                    n.consumed_at.is_not(None),
                    n.consumed_at < before,
                    n.status == "consumed",
                    ~waiting_hook,
                    ~waiting_channel,
                )
                .order_by(n.consumed_at)
                .limit(batch)
            )
            return NOTIFICATIONS, n.id, chosen
        raise ValueError(f"retention does not prune {table!r}")
