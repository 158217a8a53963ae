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
* ``notifications`` consumed (by a poll or a webhook 2xx) before it, and settled ones
  (``suppressed``, ``superseded``, ``expired``, or ``system`` project notices) made
  before it (an expired one also past its deadline before it), that no webhook
  delivery, channel retry or channel fallback step still waits on. A settled row
  never changes again and none of them is ever delivered, so the instant it was made
  is its age, as ``consumed_at`` is a consumed one's: the timeline shows such a
  message only at that instant, so pruning never removes an entry younger than the
  cutoff. A batch takes consumed rows first and fills up with settled ones. The
  rows that hang off a message (webhook and channel attempts, finished fallbacks)
  go by their own instants above; its inbox states are columns of its row.

What never goes: pending, staged (deferred) or failed notifications, wakeups,
trigger events, webhook deliveries, schedules, and anything younger than the cutoff.

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

from sqlalchemy import ColumnElement, Select, Table, delete, exists, or_, select, text
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
from delivery.store.tables.core import SETTLED_PREDICATE

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
        deleted = 0
        async with write_transaction(self.engine) as conn:
            # Most tables have one selection; notifications have two (consumed, then
            # settled), which share the batch so a transaction stays bounded.
            for target, key, chosen in self._batches(table, cutoffs):
                if deleted >= batch:
                    break
                limited = chosen.limit(batch - deleted).scalar_subquery()
                result = await conn.execute(delete(target).where(key.in_(limited)))
                deleted += int(result.rowcount or 0)
        return deleted

    @staticmethod
    def _batches(
        table: str, cutoffs: Cutoffs
    ) -> list[tuple[Table, ColumnElement[Any], Select[Any]]]:
        """The oldest-first selections (unlimited) whose rows ``table``'s batch deletes."""
        if table == "notifications":
            return _notification_batches(cutoffs.rows)
        return [SqlRetentionStore._batch(table, cutoffs)]

    @staticmethod
    def _batch(table: str, cutoffs: Cutoffs) -> tuple[Table, ColumnElement[Any], Select[Any]]:
        before = cutoffs.rows
        if table == "fires":
            f = FIRES.c
            unsent = exists().where(OUTBOX.c.msg_id == f.id, OUTBOX.c.sent_at.is_(None))
            chosen = select(f.id).where(f.fire_at < cutoffs.fires, ~unsent).order_by(f.fire_at)
            return FIRES, f.id, chosen
        if table == "schedule_changes":
            c = SCHEDULE_CHANGES.c
            chosen = select(c.id).where(c.changed_at < before).order_by(c.changed_at)
            return SCHEDULE_CHANGES, c.id, chosen
        if table == "webhook_attempts":
            a = WEBHOOK_ATTEMPTS.c
            # seq grows with time: the oldest rows are the first ones in key order.
            chosen = select(a.seq).where(a.created_at < before).order_by(a.seq)
            return WEBHOOK_ATTEMPTS, a.seq, chosen
        if table == "channel_attempts":
            ch = CHANNEL_ATTEMPTS.c
            chosen = (
                select(ch.id)
                .where(ch.created_at < before, ch.next_attempt_at.is_(None))
                .order_by(ch.created_at)
            )
            return CHANNEL_ATTEMPTS, ch.id, chosen
        if table == "channel_fallbacks":
            fb = CHANNEL_FALLBACKS.c
            chosen = (
                select(fb.notification_id)
                .where(fb.updated_at < before, fb.next_attempt_at.is_(None))
                .order_by(fb.updated_at)
            )
            return CHANNEL_FALLBACKS, fb.notification_id, chosen
        raise ValueError(f"retention does not prune {table!r}")


def _notification_batches(
    before: datetime,
) -> list[tuple[Table, ColumnElement[Any], Select[Any]]]:
    """Consumed notifications by ``consumed_at``, then settled ones by ``created_at``."""
    n = NOTIFICATIONS.c
    # What could still send it, or record one more step of sending it: such a row
    # stays until that is over, whatever its status says.
    waiting = (
        ~exists().where(DELIVERIES.c.notification_id == n.id, DELIVERIES.c.status == "pending"),
        ~exists().where(
            CHANNEL_ATTEMPTS.c.notification_id == n.id,
            CHANNEL_ATTEMPTS.c.next_attempt_at.is_not(None),
        ),
        ~exists().where(
            CHANNEL_FALLBACKS.c.notification_id == n.id,
            CHANNEL_FALLBACKS.c.next_attempt_at.is_not(None),
        ),
    )
    consumed = (
        select(n.id)
        .where(
            n.consumed_at.is_not(None),
            n.consumed_at < before,
            n.status == "consumed",
            *waiting,
        )
        .order_by(n.consumed_at)
    )
    settled = (
        select(n.id)
        .where(
            # Spelt as the partial index's predicate, literally, so both databases use it.
            text(SETTLED_PREDICATE),
            n.created_at < before,
            or_(n.expires_at.is_(None), n.expires_at < before),
            *waiting,
        )
        .order_by(n.created_at)
    )
    return [(NOTIFICATIONS, n.id, consumed), (NOTIFICATIONS, n.id, settled)]
