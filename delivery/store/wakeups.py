"""
One-off wakeups as the API writes and lists them (the scheduler claims due ones
through :class:`delivery.store.schedules.ScheduleStore`).
"""

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy import select, update

from delivery.store.common import StoreBase, owned
from delivery.store.creates import ExpectedOffset, offset_guard, row_values
from delivery.store.engine import Engine
from delivery.store.idempotency import Recorded, write_recorded
from delivery.store.steps import InsertRows, Runner, inserting
from delivery.store.tables import WAKEUPS, WakeupRow


class CancelOutcome(StrEnum):
    """What :meth:`Wakeups.cancel_wakeup` did."""

    CANCELLED = "cancelled"
    ALREADY_CANCELLED = "already_cancelled"
    NOT_FOUND = "not_found"
    NOT_PENDING = "not_pending"


class Wakeups(Protocol):
    """
    A project's wakeups.

    Invariants: a wakeup is cancelled only while pending and unclaimed (a
    claimed one may have produced its message already), so a cancelled wakeup
    never fires.
    """

    async def insert_wakeup(
        self,
        row: WakeupRow | Mapping[str, Any],
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        """
        Insert a new pending wakeup (a row, or its column values: every column);
        with ``record`` (its ``Idempotency-Key`` answer) in the same transaction,
        unless that key already has a live record: then nothing is written and the
        outcome carries that record. With ``expected``, nothing is written either
        when the pair's clock offset is not that one (the outcome is ``moved``).
        """
        ...

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
        ...

    async def cancel_wakeup(
        self, project_id: str, agent_id: str, wakeup_id: str, now: datetime
    ) -> CancelOutcome:
        """Cancel a pending, unclaimed wakeup."""
        ...


class WakeupStore(StoreBase):
    """:class:`Wakeups` on SQLite and PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # One call to SQLite's driver thread per operation (delivery.store.steps).
        self._runner = Runner(engine, reader=self._reader)

    async def insert_wakeup(
        self,
        row: WakeupRow | Mapping[str, Any],
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        """See :meth:`Wakeups.insert_wakeup`."""
        return await write_recorded(
            self._runner,
            inserting(InsertRows(WAKEUPS, [row_values(row)])),
            record,
            guard=offset_guard(expected),
        )

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
        conds = owned(WAKEUPS, project_id, agent_id=agent_id, user_id=user_id)
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
        owner = owned(WAKEUPS, project_id, agent_id=agent_id, id=wakeup_id)
        async with self.write() as conn:
            # An advanced pair's wakeup is stamped on the pair's clock, like every
            # other instant of its row: ``scheduled_at - due_at`` is the pair's offset.
            shift = (
                await conn.execute(select(WAKEUPS.c.scheduled_at, WAKEUPS.c.due_at).where(*owner))
            ).first()
            at = now
            if shift is not None and shift.due_at is not None:
                at = now + (shift.scheduled_at - shift.due_at)
            result = await conn.execute(
                update(WAKEUPS)
                .where(
                    *owner,
                    WAKEUPS.c.status == "pending",
                    (WAKEUPS.c.claimed_until.is_(None)) | (WAKEUPS.c.claimed_until < now),
                )
                .values(status="cancelled", cancelled_at=at)
            )
            if result.rowcount:
                return CancelOutcome.CANCELLED
            found = (await conn.execute(select(WAKEUPS.c.status).where(*owner))).first()
        if found is None:
            return CancelOutcome.NOT_FOUND
        if found.status == "cancelled":
            return CancelOutcome.ALREADY_CANCELLED
        return CancelOutcome.NOT_PENDING
