"""
The outbox relay's store: batches of unsent rows, their ``sent_at`` stamps, the
purge of old sent rows, and the promotion of staged notifications.

:class:`RelayStore` is the contract the relay relies on; :class:`OutboxStore`
implements it on SQLite and PostgreSQL, choosing each method's form once per
store from the engine's :class:`~delivery.store.engine.Capabilities`.
"""

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from functools import partial
from typing import Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from delivery.store import direct
from delivery.store.engine import Capabilities, Engine, write_transaction
from delivery.store.staging import promote
from delivery.store.tables import OUTBOX

_STAMP_CHUNK = 1000
"""Ids per ``UPDATE ... WHERE id IN (...)`` when stamping on PostgreSQL."""


class UnsentMessage(Protocol):
    """An unsent outbox row: what the relay publishes."""

    @property
    def id(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def msg_id(self) -> str: ...
    @property
    def payload(self) -> str: ...
    @property
    def headers(self) -> str | None: ...


class UnsentBatch:
    """
    A batch of unsent rows held by one relay (:meth:`RelayStore.unsent`).

    Attributes:
        rows: the rows, in publishing order.
        stamps: the ``sent_at`` stamps recorded so far, written when the batch ends.
    """

    def __init__(self, rows: Sequence[UnsentMessage]) -> None:
        self.rows = rows
        self.stamps: list[tuple[list[int], datetime]] = []

    def mark_sent(self, ids: Sequence[int], at: datetime) -> None:
        """Record ``sent_at = at`` for the rows of ``ids`` (ids of this batch)."""
        if ids:
            self.stamps.append((list(ids), at))


class RelayStore(Protocol):
    """What the outbox relay needs from the store."""

    async def promote(self, now: datetime) -> int:
        """
        Make every staged notification whose fire instant is at or before ``now``
        visible (:func:`delivery.store.staging.promote`); idempotent. How many.
        """
        ...

    def unsent(self, now: datetime, limit: int) -> AbstractAsyncContextManager[UnsentBatch]:
        """
        Hold a batch of up to ``limit`` unsent rows (``sent_at`` NULL) whose
        ``available_at`` is at or before ``now``, ordered by (``available_at``,
        ``id``), for the length of the ``async with`` block.

        While the block runs, no other relay holding a batch of its own gets
        these rows (on PostgreSQL they are locked and skipped by the others; on
        SQLite the one daemon runs one relay). The stamps recorded with
        :meth:`UnsentBatch.mark_sent` are committed when the block ends
        without an exception, and none of them if it raises. A row left
        unstamped is returned again by a later batch; stamping a row again
        only moves its ``sent_at``.
        """
        ...

    async def prune(self, sent_before: datetime) -> int:
        """Delete the rows sent before ``sent_before``; how many. Unsent rows stay."""
        ...


class OutboxStore:
    """
    :class:`RelayStore` on SQLite and PostgreSQL.

    With ``SKIP LOCKED`` (PostgreSQL) a batch is read ``FOR UPDATE SKIP LOCKED``
    in a transaction that stays open while it is published and commits the
    stamps, so the relays of several scheduler replicas split the work instead
    of all publishing everything. Without it (SQLite, one process) the batch is
    read, published, then stamped in a short write transaction, on the driver's
    thread where that is available (bound as prepared tuples,
    :mod:`delivery.store.direct`).

    Args:
        engine: the store's engine.
        capabilities: what the database can do; from ``engine`` by default.
    """

    def __init__(self, engine: Engine, *, capabilities: Capabilities | None = None) -> None:
        self.engine = engine
        self._caps = capabilities or Capabilities.of(engine)

    async def promote(self, now: datetime) -> int:
        """See :meth:`RelayStore.promote`."""
        return await promote(self.engine, now)

    @asynccontextmanager
    async def unsent(self, now: datetime, limit: int) -> AsyncIterator[UnsentBatch]:
        """See :meth:`RelayStore.unsent`."""
        # A staged notification's notification.created waits for its fire
        # instant. The (available_at, id) order publishes rows in the order they
        # became due, so a burst's fires are not queued behind later rows.
        o = OUTBOX.c
        stmt = (
            select(o.id, o.subject, o.msg_id, o.payload, o.headers)
            .where(o.sent_at.is_(None), o.available_at <= now)
            .order_by(o.available_at, o.id)
            .limit(limit)
        )
        if self._caps.skip_locked:
            async with write_transaction(self.engine) as conn:
                batch = UnsentBatch(
                    (await conn.execute(stmt.with_for_update(skip_locked=True))).all()
                )
                yield batch
                await _stamp(conn, batch.stamps)
            return
        async with self.engine.connect() as conn:
            batch = UnsentBatch((await conn.execute(stmt)).all())
        yield batch
        if not batch.stamps:
            return
        if self._caps.driver_thread:
            await direct.write(self.engine, partial(_stamp_direct, stamps=batch.stamps))
            return
        async with write_transaction(self.engine) as conn:
            await _stamp(conn, batch.stamps)

    async def release_held(self, subject: str, now: datetime) -> int:
        """
        Make the unsent rows of ``subject`` held past ``now`` available at ``now``;
        how many.

        A fire handed to a dispatcher in the same process has its row held for a
        grace period (:mod:`delivery.handoff`). When that process is known dead
        (the one process on a single-writer database starting again), nothing
        can stamp those rows any more: the relay need not wait out the grace.
        """
        o = OUTBOX.c
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(
                update(OUTBOX)
                .where(o.subject == subject, o.sent_at.is_(None), o.available_at > now)
                .values(available_at=now)
            )
        return int(result.rowcount or 0)

    async def prune(self, sent_before: datetime) -> int:
        """See :meth:`RelayStore.prune`."""
        async with write_transaction(self.engine) as conn:
            result = await conn.execute(
                delete(OUTBOX).where(OUTBOX.c.sent_at.is_not(None), OUTBOX.c.sent_at < sent_before)
            )
        return int(result.rowcount or 0)


def _stamp_direct(db: sqlite3.Connection, *, stamps: list[tuple[list[int], datetime]]) -> None:
    # Bound as prepared tuples on the driver's thread (delivery.store.direct).
    for ids, at in stamps:
        direct.update_in(db, OUTBOX, "id", ids, {"sent_at": at})


async def _stamp(conn: AsyncConnection, stamps: list[tuple[list[int], datetime]]) -> None:
    for ids, at in stamps:
        for start in range(0, len(ids), _STAMP_CHUNK):
            chunk = ids[start : start + _STAMP_CHUNK]
            await conn.execute(update(OUTBOX).where(OUTBOX.c.id.in_(chunk)).values(sent_at=at))
