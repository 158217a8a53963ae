"""
:class:`SqlStore`: the API's persistence, one implementation for SQLite and PostgreSQL.

Every method that touches tenant data takes the caller's ``project_id`` and filters
on it, so a foreign id behaves exactly like an unknown one.
Statements are SQLAlchemy Core: one round trip per call, no ORM identity map.
Write methods run in one transaction each; on SQLite the transaction takes the
write lock up front (``BEGIN IMMEDIATE``) so a read-then-write never dies on a
lock upgrade while the daemon writes too.
"""

import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Table, and_, delete, func, select, text, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.bus.subjects import DEFAULT_SUBJECT_PREFIX, Subjects
from delivery.store.bulk import insert_ignoring_duplicates, insert_outbox
from delivery.store.engine import is_sqlite, read_connection, write_transaction
from delivery.store.staging import STAGED, restage_fires, staged_fires
from delivery.store.tables import (
    API_KEYS,
    EVENTS,
    FIRES,
    IDEMPOTENCY,
    INVENTORY,
    NOTIFICATIONS,
    OUTBOX,
    PROJECTS,
    SCHEDULES,
    WAKEUPS,
    InventoryItemRow,
    ProjectRow,
    ScheduleRow,
    TriggerEventRow,
    WakeupRow,
)


def new_id(prefix: str) -> str:
    """A random prefixed id (``sch_3f9a...``): 96 bits, so collisions are not a concern."""
    return f"{prefix}_{secrets.token_hex(12)}"


def hash_api_key(key: str) -> str:
    """The stored form of an API key: hex SHA-256 (keys are random, so no salt is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the stored and echoed form."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class CancelOutcome(StrEnum):
    """What :meth:`SqlStore.cancel_wakeup` did."""

    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"
    NOT_PENDING = "not_pending"


class ConsumeOutcome(StrEnum):
    """What :meth:`SqlStore.consume_notification` did."""

    CONSUMED = "consumed"
    ALREADY = "already"
    NOT_FOUND = "not_found"
    NOT_PENDING = "not_pending"


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """
    The recorded answer to an ``Idempotency-Key`` (:meth:`SqlStore.find_idempotency_record`).

    Attributes:
        request_hash: SHA-256 of the first request's body; another body with the
            same key is a reuse, not a retry.
        status_code: the first answer's status.
        body: the first answer's body, as stored (sealed by the API).
    """

    request_hash: str
    status_code: int
    body: str


class SqlStore:
    """
    The async store over one engine.

    Args:
        engine: from :func:`delivery.store.engine.create_engine`; the schema
            must exist (:func:`delivery.store.migrate.migrate`).

        subjects: the deployment's subjects (``Settings.subject_prefix``), for
            the restage messages of :mod:`delivery.store.staging`.

    The store never closes the engine; its owner does.
    """

    def __init__(self, engine: AsyncEngine, *, subjects: Subjects | None = None) -> None:
        self.engine = engine
        # Writes that restage a fire queue a message on this deployment's subjects.
        self.subjects = subjects or Subjects(DEFAULT_SUBJECT_PREFIX)
        self._sqlite = is_sqlite(str(engine.url))
        # Every read here is one statement, so PostgreSQL reads skip BEGIN and
        # ROLLBACK (two round trips that cost more than the query on the polling
        # path). pysqlite never opens a transaction for a SELECT anyway.
        self._reader = (
            engine if self._sqlite else engine.execution_options(isolation_level="AUTOCOMMIT")
        )

    # --- plumbing -------------------------------------------------------------

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """
        One write transaction: committed when the block exits, rolled back on error.

        On SQLite the write lock is taken at BEGIN, so concurrent writers queue
        on ``busy_timeout`` instead of failing with SQLITE_BUSY when a deferred
        transaction upgrades from read to write.
        """
        async with write_transaction(self.engine) as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """
        A connection for single-statement reads (autocommit on PostgreSQL: each
        statement sees its own snapshot, so never use it for read-then-write).
        """
        async with read_connection(self._reader) as conn:
            yield conn

    async def ping(self) -> None:
        """Run a trivial query; raises whatever the driver raises when the database is down."""
        async with self.read() as conn:
            await conn.execute(text("SELECT 1"))

    # --- projects and keys ----------------------------------------------------

    async def ensure_project(self, name: str, now: datetime) -> ProjectRow:
        """The project called ``name``, created (``proj_…``) if it does not exist yet."""
        async with self.write() as conn:
            await insert_ignoring_duplicates(
                conn,
                PROJECTS,
                [{"id": new_id("proj"), "name": name, "created_at": now}],
                unique=["name"],
            )
            row = (await conn.execute(select(PROJECTS).where(PROJECTS.c.name == name))).one()
        return ProjectRow(**row._mapping)

    async def create_api_key(self, project_id: str, now: datetime, key: str | None = None) -> str:
        """
        Store a new API key for ``project_id`` and return it in clear, the only time it exists.

        Args:
            key: use this key instead of a random one (the bootstrap key);
                storing the same key twice is a no-op.
        """
        key = key or f"dlv_{secrets.token_urlsafe(32)}"
        async with self.write() as conn:
            await insert_ignoring_duplicates(
                conn,
                API_KEYS,
                [
                    {
                        "id": new_id("key"),
                        "project_id": project_id,
                        "key_hash": hash_api_key(key),
                        "prefix": key[:12],
                        "created_at": now,
                        "revoked_at": None,
                    }
                ],
                unique=["key_hash"],
            )
        return key

    async def project_for_key(self, key: str) -> str | None:
        """The project id an unrevoked ``key`` belongs to, or ``None``."""
        stmt = select(API_KEYS.c.project_id).where(
            API_KEYS.c.key_hash == hash_api_key(key), API_KEYS.c.revoked_at.is_(None)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).scalar_one_or_none()

    # --- schedules ------------------------------------------------------------

    async def insert_schedule(self, row: ScheduleRow) -> None:
        """Insert a new schedule row as given."""
        async with self.write() as conn:
            await conn.execute(SCHEDULES.insert().values(**row.model_dump()))

    async def get_schedule(
        self, project_id: str, agent_id: str, user_id: str, schedule_id: str
    ) -> ScheduleRow | None:
        """One schedule of the (agent, user) pair, or ``None``."""
        stmt = select(SCHEDULES).where(
            SCHEDULES.c.id == schedule_id,
            SCHEDULES.c.project_id == project_id,
            SCHEDULES.c.agent_id == agent_id,
            SCHEDULES.c.user_id == user_id,
        )
        async with self.read() as conn:
            row = (await conn.execute(stmt)).one_or_none()
        return None if row is None else ScheduleRow(**row._mapping)

    async def list_schedules(
        self, project_id: str, agent_id: str, user_id: str
    ) -> list[ScheduleRow]:
        """Every schedule of the (agent, user) pair, oldest first."""
        stmt = (
            select(SCHEDULES)
            .where(
                SCHEDULES.c.project_id == project_id,
                SCHEDULES.c.agent_id == agent_id,
                SCHEDULES.c.user_id == user_id,
            )
            .order_by(SCHEDULES.c.created_at, SCHEDULES.c.id)
        )
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [ScheduleRow(**r._mapping) for r in rows]

    async def update_schedule(
        self,
        row: ScheduleRow,
        changes: Mapping[str, Any],
        expected_version: int,
        *,
        now: datetime,
        drop_staged_after: datetime | None = None,
    ) -> bool:
        """
        Apply ``changes`` (column -> value) to ``row`` if nobody wrote it since it was read.

        Compare-and-set on ``version``: the daemon bumps it when it fires, so
        a PATCH computed from a stale read is retried instead of rewinding
        ``next_fire_at``. The caller includes the new ``version`` in ``changes``.

        A fire the scheduler staged ahead of ``now`` is restaged in the same
        transaction, so its message is composed from the new state
        (:func:`delivery.store.staging.restage_fires`).

        Args:
            now: the instant of the write.
            drop_staged_after: the timing changed at this instant: fires the
                scheduler staged after it (lookahead) are deleted with their
                unpublished outbox entries, in the same transaction, so the old
                timing never fires; ``last_fire_at`` goes back to the last fire
                actually due.

        Returns:
            False when the version moved (or the row vanished); nothing written.
        """
        stmt = (
            update(SCHEDULES)
            .where(
                SCHEDULES.c.id == row.id,
                SCHEDULES.c.project_id == row.project_id,
                SCHEDULES.c.version == expected_version,
            )
            .values(**changes)
        )
        async with self.write() as conn:
            result = await conn.execute(stmt)
            if not result.rowcount:
                return False
            await self._restage(conn, now, FIRES.c.schedule_id == row.id)
            if drop_staged_after is not None:
                await self._drop_staged(conn, row.id, drop_staged_after)
        return True

    @staticmethod
    async def _drop_staged(conn: AsyncConnection, schedule_id: str, after: datetime) -> None:
        # Staged = written before its instant. Advance-time fires lie in the future
        # too, but are written at their simulated instant and already made their
        # notifications: they stay.
        is_staged = (
            FIRES.c.schedule_id == schedule_id,
            FIRES.c.fire_at > after,
            FIRES.c.created_at < FIRES.c.fire_at,
        )
        await conn.execute(
            delete(OUTBOX).where(
                OUTBOX.c.msg_id.in_(select(FIRES.c.id).where(*is_staged)),
                OUTBOX.c.sent_at.is_(None),
            )
        )
        dropped = await conn.execute(delete(FIRES).where(*is_staged))
        if dropped.rowcount:
            last = (
                select(func.max(FIRES.c.fire_at))
                .where(FIRES.c.schedule_id == schedule_id, FIRES.c.status == "fired")
                .scalar_subquery()
            )
            await conn.execute(
                update(SCHEDULES).where(SCHEDULES.c.id == schedule_id).values(last_fire_at=last)
            )

    async def _restage(self, conn: AsyncConnection, now: datetime, *where: Any) -> None:
        await restage_fires(conn, staged_fires(now).where(*where), subjects=self.subjects, now=now)

    async def delete_schedule(
        self, project_id: str, agent_id: str, user_id: str, schedule_id: str, *, now: datetime
    ) -> bool:
        """
        Delete a schedule and its fire history (the Sonzai docs: delete removes "all associated
        fire history"); notifications already produced stay in the queue.

        Returns:
            Whether a schedule was deleted.
        """
        async with self.write() as conn:
            result = await conn.execute(
                delete(SCHEDULES).where(
                    SCHEDULES.c.id == schedule_id,
                    SCHEDULES.c.project_id == project_id,
                    SCHEDULES.c.agent_id == agent_id,
                    SCHEDULES.c.user_id == user_id,
                )
            )
            if not result.rowcount:
                return False
            # A staged fire's message may be composed already: drop it, and have
            # the dispatcher drop any a racing dispatcher writes (it finds no fire).
            await self._restage(
                conn,
                now,
                FIRES.c.schedule_id == schedule_id,
                FIRES.c.project_id == project_id,
            )
            # Entries not yet published go too: a fire staged by the lookahead
            # (or one the relay has not reached) must not reach the dispatcher.
            await conn.execute(
                delete(OUTBOX).where(
                    OUTBOX.c.sent_at.is_(None),
                    OUTBOX.c.msg_id.in_(
                        select(FIRES.c.id).where(
                            FIRES.c.schedule_id == schedule_id, FIRES.c.project_id == project_id
                        )
                    ),
                )
            )
            await conn.execute(
                delete(FIRES).where(
                    FIRES.c.schedule_id == schedule_id, FIRES.c.project_id == project_id
                )
            )
        return True

    # --- wakeups --------------------------------------------------------------

    async def insert_wakeup(self, row: WakeupRow) -> None:
        """Insert a new pending wakeup."""
        async with self.write() as conn:
            await conn.execute(WAKEUPS.insert().values(**row.model_dump()))

    async def list_wakeups(
        self,
        project_id: str,
        agent_id: str,
        *,
        user_id: str | None,
        status: str | None,
        limit: int,
    ) -> list[WakeupRow]:
        """The agent's wakeups, soonest first, optionally for one user or status."""
        conds = [WAKEUPS.c.project_id == project_id, WAKEUPS.c.agent_id == agent_id]
        if user_id is not None:
            conds.append(WAKEUPS.c.user_id == user_id)
        if status is not None:
            conds.append(WAKEUPS.c.status == status)
        stmt = (
            select(WAKEUPS)
            .where(*conds)
            .order_by(WAKEUPS.c.scheduled_at, WAKEUPS.c.id)
            .limit(limit)
        )
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [WakeupRow(**r._mapping) for r in rows]

    async def cancel_wakeup(
        self, project_id: str, agent_id: str, wakeup_id: str, now: datetime
    ) -> CancelOutcome:
        """
        Cancel a pending wakeup that no scheduler has claimed (an in-flight claim may
        already have produced the message, so it counts as no longer pending).
        """
        owner = and_(
            WAKEUPS.c.id == wakeup_id,
            WAKEUPS.c.project_id == project_id,
            WAKEUPS.c.agent_id == agent_id,
        )
        async with self.write() as conn:
            result = await conn.execute(
                update(WAKEUPS)
                .where(
                    owner,
                    WAKEUPS.c.status == "pending",
                    (WAKEUPS.c.claimed_until.is_(None)) | (WAKEUPS.c.claimed_until < now),
                )
                .values(status="cancelled", cancelled_at=now)
            )
            if result.rowcount:
                return CancelOutcome.CANCELLED
            exists = (await conn.execute(select(WAKEUPS.c.id).where(owner))).first()
        return CancelOutcome.NOT_PENDING if exists else CancelOutcome.NOT_FOUND

    # --- trigger events -------------------------------------------------------

    async def insert_event(self, row: TriggerEventRow, outbox: Mapping[str, Any]) -> None:
        """Insert the event and its ``event.accepted`` outbox message in one transaction."""
        async with self.write() as conn:
            await conn.execute(EVENTS.insert().values(**row.model_dump()))
            await insert_outbox(conn, [outbox])

    async def list_events(
        self, project_id: str, agent_id: str, *, user_id: str | None, limit: int
    ) -> list[TriggerEventRow]:
        """The agent's trigger events, newest first."""
        conds = [EVENTS.c.project_id == project_id, EVENTS.c.agent_id == agent_id]
        if user_id is not None:
            conds.append(EVENTS.c.user_id == user_id)
        stmt = (
            select(EVENTS)
            .where(*conds)
            .order_by(EVENTS.c.created_at.desc(), EVENTS.c.id.desc())
            .limit(limit)
        )
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [TriggerEventRow(**r._mapping) for r in rows]

    # --- inventory ------------------------------------------------------------

    async def insert_item(self, row: InventoryItemRow) -> None:
        """Insert a new inventory item."""
        async with self.write() as conn:
            await conn.execute(INVENTORY.insert().values(**row.model_dump()))

    async def get_item(
        self, project_id: str, agent_id: str, user_id: str, item_id: str
    ) -> InventoryItemRow | None:
        """One item of the (agent, user) pair, or ``None``."""
        stmt = select(INVENTORY).where(
            INVENTORY.c.id == item_id,
            INVENTORY.c.project_id == project_id,
            INVENTORY.c.agent_id == agent_id,
            INVENTORY.c.user_id == user_id,
        )
        async with self.read() as conn:
            row = (await conn.execute(stmt)).one_or_none()
        return None if row is None else InventoryItemRow(**row._mapping)

    async def find_items(
        self, project_id: str, agent_id: str, user_id: str, *, item_type: str | None
    ) -> list[InventoryItemRow]:
        """The pair's items, oldest first, optionally of one ``item_type``."""
        conds = [
            INVENTORY.c.project_id == project_id,
            INVENTORY.c.agent_id == agent_id,
            INVENTORY.c.user_id == user_id,
        ]
        if item_type is not None:
            conds.append(INVENTORY.c.item_type == item_type)
        stmt = select(INVENTORY).where(*conds).order_by(INVENTORY.c.created_at, INVENTORY.c.id)
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [InventoryItemRow(**r._mapping) for r in rows]

    async def update_item(
        self,
        project_id: str,
        agent_id: str,
        user_id: str,
        item_id: str,
        *,
        properties: Mapping[str, Any] | None,
        fields: Mapping[str, Any],
        now: datetime,
    ) -> InventoryItemRow | None:
        """
        Merge ``properties`` into the item's (top-level keys replace) and set ``fields``.

        The read and the write share one transaction, so two concurrent merges
        both land.

        Returns:
            The updated item, or ``None`` when it does not exist in this pair.
        """
        owner = and_(
            INVENTORY.c.id == item_id,
            INVENTORY.c.project_id == project_id,
            INVENTORY.c.agent_id == agent_id,
            INVENTORY.c.user_id == user_id,
        )
        async with self.write() as conn:
            row = (
                await conn.execute(select(INVENTORY).where(owner).with_for_update())
            ).one_or_none()
            if row is None:
                return None
            item = InventoryItemRow(**row._mapping)
            values: dict[str, Any] = {**fields, "updated_at": now}
            if properties is not None:
                merged = {**json.loads(item.properties_json), **properties}
                values["properties_json"] = canonical_json(merged)
            await conn.execute(update(INVENTORY).where(owner).values(**values))
            await self._restage_item_fires(conn, now, project_id, agent_id, user_id, item_id)
        return item.model_copy(update=values)

    async def _restage_item_fires(
        self,
        conn: AsyncConnection,
        now: datetime,
        project_id: str,
        agent_id: str,
        user_id: str,
        item_id: str,
    ) -> None:
        # A message shows its item's properties as of the fire instant: the
        # staged fires of the owner's schedules that use the item are composed
        # again. Only the owner's schedules can read the item (its owner check).
        s = SCHEDULES.c
        linked = select(s.id).where(
            s.project_id == project_id,
            s.agent_id == agent_id,
            s.user_id == user_id,
            s.inventory_item_id == item_id,
        )
        await self._restage(conn, now, FIRES.c.schedule_id.in_(linked.scalar_subquery()))

    async def delete_item(
        self, project_id: str, agent_id: str, user_id: str, item_id: str, *, now: datetime
    ) -> bool:
        """Delete one item; schedules linked to it keep firing without it."""
        async with self.write() as conn:
            result = await conn.execute(
                delete(INVENTORY).where(
                    INVENTORY.c.id == item_id,
                    INVENTORY.c.project_id == project_id,
                    INVENTORY.c.agent_id == agent_id,
                    INVENTORY.c.user_id == user_id,
                )
            )
            if result.rowcount:
                await self._restage_item_fires(conn, now, project_id, agent_id, user_id, item_id)
        return bool(result.rowcount)

    # --- notifications --------------------------------------------------------

    async def list_queue(
        self,
        project_id: str,
        agent_id: str,
        *,
        status: str,
        user_id: str | None,
        limit: int,
    ) -> Sequence[RowMapping]:
        """The agent's queue in one status, oldest first (a queue is read in order)."""
        n = NOTIFICATIONS.c
        conds = [n.project_id == project_id, n.agent_id == agent_id, n.status == status]
        if user_id is not None:
            conds.append(n.user_id == user_id)
        stmt = select(*_QUEUE_COLUMNS).where(*conds).order_by(n.created_at, n.id).limit(limit)
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def notification_history(
        self, project_id: str, agent_id: str, *, limit: int
    ) -> Sequence[RowMapping]:
        """Every notification of the agent, every status and user, newest first."""
        n = NOTIFICATIONS.c
        stmt = (
            select(*_QUEUE_COLUMNS)
            .where(n.project_id == project_id, n.agent_id == agent_id, n.status != STAGED)
            .order_by(n.created_at.desc(), n.id.desc())
            .limit(limit)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def consume_notification(
        self, project_id: str, agent_id: str, message_id: str, now: datetime
    ) -> ConsumeOutcome:
        """
        Mark a pending message consumed; consuming it again is a no-op.

        Returns:
            ``CONSUMED`` when this call changed it, ``ALREADY`` when it was
            consumed before, ``NOT_PENDING`` for expired / failed ones,
            ``NOT_FOUND`` for an unknown or foreign id.
        """
        n = NOTIFICATIONS.c
        # A staged message does not exist yet as far as clients can tell.
        owner = and_(
            n.id == message_id,
            n.project_id == project_id,
            n.agent_id == agent_id,
            n.status != STAGED,
        )
        async with self.write() as conn:
            result = await conn.execute(
                update(NOTIFICATIONS)
                .where(owner, n.status == "pending")
                .values(status="consumed", consumed_at=now)
            )
            if result.rowcount:
                return ConsumeOutcome.CONSUMED
            status = (await conn.execute(select(n.status).where(owner))).scalar_one_or_none()
        if status is None:
            return ConsumeOutcome.NOT_FOUND
        return ConsumeOutcome.ALREADY if status == "consumed" else ConsumeOutcome.NOT_PENDING

    async def list_project_notifications(
        self,
        project_id: str,
        *,
        agent_id: str | None,
        event_type: str | None,
        ack_status: str | None,
        limit: int,
    ) -> Sequence[RowMapping]:
        """The project view, oldest first, optionally filtered."""
        n = NOTIFICATIONS.c
        conds = [n.project_id == project_id, n.status != STAGED]
        if agent_id is not None:
            conds.append(n.agent_id == agent_id)
        if event_type is not None:
            conds.append(n.event_type == event_type)
        if ack_status is not None:
            conds.append(n.ack_status == ack_status)
        stmt = (
            select(
                n.id,
                n.project_id,
                n.agent_id,
                n.user_id,
                n.event_type,
                n.ack_status,
                n.payload_json,
                n.created_at,
                n.acknowledged_at,
            )
            .where(*conds)
            .order_by(n.created_at, n.id)
            .limit(limit)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def acknowledge(self, project_id: str, ids: Sequence[str], now: datetime) -> int:
        """Acknowledge the listed pending notifications of the project; returns how many changed."""
        if not ids:
            return 0
        n = NOTIFICATIONS.c
        async with self.write() as conn:
            result = await conn.execute(
                update(NOTIFICATIONS)
                .where(
                    n.project_id == project_id,
                    n.id.in_(list(ids)),
                    n.ack_status == "pending",
                    n.status != STAGED,
                )
                .values(ack_status="acknowledged", acknowledged_at=now)
            )
        return int(result.rowcount or 0)

    async def acknowledge_all(
        self, project_id: str, *, agent_id: str | None, event_type: str | None, now: datetime
    ) -> int:
        """Acknowledge every pending notification matching the filters; returns the count."""
        n = NOTIFICATIONS.c
        conds = [n.project_id == project_id, n.ack_status == "pending", n.status != STAGED]
        if agent_id is not None:
            conds.append(n.agent_id == agent_id)
        if event_type is not None:
            conds.append(n.event_type == event_type)
        async with self.write() as conn:
            result = await conn.execute(
                update(NOTIFICATIONS)
                .where(*conds)
                .values(ack_status="acknowledged", acknowledged_at=now)
            )
        return int(result.rowcount or 0)

    # --- idempotency ----------------------------------------------------------

    async def find_idempotency_record(
        self, project_id: str, route: str, key: str, *, now: datetime
    ) -> IdempotencyRecord | None:
        """
        The live record of ``key`` on ``route``, or None.

        Expired records, and reservation rows (``status_code = 0``) left by
        versions that reserved a key before running the request, count as absent.
        Inside a unit of work that has written, this reads its uncommitted state.
        """
        i = IDEMPOTENCY.c
        async with self.read() as conn:
            row = (
                await conn.execute(
                    select(i.request_hash, i.status_code, i.response_body, i.expires_at).where(
                        i.project_id == project_id, i.route == route, i.key == key
                    )
                )
            ).one_or_none()
        if row is None or row.status_code == 0 or row.expires_at <= now:
            return None
        return IdempotencyRecord(row.request_hash, row.status_code, row.response_body)

    async def record_idempotency(
        self,
        project_id: str,
        route: str,
        key: str,
        request_hash: str,
        *,
        status_code: int,
        body: str,
        now: datetime,
        ttl: timedelta,
    ) -> bool:
        """
        Record the answer to ``key``, unless a live record exists already.

        Called inside the request's unit of work, so the record commits with the
        writes it describes, or not at all. Of two concurrent requests with one
        key, the later insert waits for the earlier transaction (PostgreSQL's
        unique index, SQLite's single writer) and then finds its record.

        Returns:
            False when another request recorded ``key`` first: the caller rolls
            its writes back and answers from that record.
        """
        i = IDEMPOTENCY.c
        async with self.write() as conn:
            await conn.execute(
                delete(IDEMPOTENCY).where(
                    i.project_id == project_id,
                    i.route == route,
                    i.key == key,
                    (i.expires_at <= now) | (i.status_code == 0),
                )
            )
            inserted = await insert_ignoring_duplicates(
                conn,
                IDEMPOTENCY,
                [
                    {
                        "project_id": project_id,
                        "route": route,
                        "key": key,
                        "request_hash": request_hash,
                        "status_code": status_code,
                        "response_body": body,
                        "created_at": now,
                        "expires_at": now + ttl,
                    }
                ],
                unique=["project_id", "route", "key"],
            )
        return inserted == 1

    async def purge_idempotency(self, now: datetime) -> int:
        """Delete expired idempotency records; returns how many."""
        async with self.write() as conn:
            result = await conn.execute(delete(IDEMPOTENCY).where(IDEMPOTENCY.c.expires_at <= now))
        return int(result.rowcount or 0)

    # --- introspection (tests, health) ----------------------------------------

    async def count(self, table: Table) -> int:
        """Rows in ``table`` across all projects (tests assert that rejections write nothing)."""
        async with self.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


_QUEUE_COLUMNS = (
    NOTIFICATIONS.c.id,
    NOTIFICATIONS.c.agent_id,
    NOTIFICATIONS.c.user_id,
    NOTIFICATIONS.c.check_type,
    NOTIFICATIONS.c.generated_message,
    NOTIFICATIONS.c.status,
    NOTIFICATIONS.c.created_at,
    NOTIFICATIONS.c.consumed_at,
    NOTIFICATIONS.c.wakeup_id,
    NOTIFICATIONS.c.source_type,
    NOTIFICATIONS.c.intent,
)
