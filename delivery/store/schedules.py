"""
The scheduler's store: stored schedules read back as the cadence engine's values,
and every statement the scheduler runs.

The API, the scheduler and advance-time all recompile a stored schedule; they
must do it the same way (:func:`compile_stored`), or ``upcoming`` and the fires
disagree (for an every-N-hours cadence the anchor decides every fire).

:class:`SchedulerStore` is the contract the scheduler relies on;
:class:`ScheduleStore` implements it on SQLite and PostgreSQL. Which form each
method takes is decided once per store from the engine's
:class:`~delivery.store.engine.Capabilities`: on SQLite the writes of a tick run
as one function on the driver's thread (:mod:`delivery.store.direct`), elsewhere
as SQLAlchemy Core statements (measured: ORM ~3k rows/s, Core 60-80k).
"""

import json
import secrets
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Select, Table, bindparam, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.asyncio import AsyncConnection

from delivery.bus.messages import FireCreated, WakeupDue
from delivery.bus.subjects import Subjects
from delivery.cadence import CompiledSchedule, compile_schedule
from delivery.domain import FireId, SourceKind, SourceRef, earliest
from delivery.planning import SchedulePlan, Skip, fire_id
from delivery.policy import source_policy
from delivery.store import direct
from delivery.store.advance import due_in_real_time
from delivery.store.common import StoreBase, canonical_json, insert_ignoring, owned
from delivery.store.creates import ExpectedOffset, offset_guard, row_values
from delivery.store.engine import Capabilities, Engine, any_row, write_transaction
from delivery.store.idempotency import Recorded, write_recorded
from delivery.store.staging import restage_fires, staged_fires
from delivery.store.steps import InsertRows, Runner, inserting
from delivery.store.tables import (
    FIRES,
    OUTBOX,
    SCHEDULE_CHANGES,
    SCHEDULES,
    WAKEUPS,
    ScheduleRow,
)


def defers(row: Any) -> bool:
    """
    Whether a ``schedules`` row defers what falls outside its active window
    (``outside_window: defer``) instead of skipping it. A row read without
    ``policy_json`` says nothing, so it skips.
    """
    get = row.get if isinstance(row, Mapping) else partial(getattr, row)
    return source_policy(get("policy_json", None)).outside_window == "defer"


def compile_stored(row: Any) -> CompiledSchedule:
    """
    Recompile a stored (already validated) schedule row.

    A schedule that defers (:func:`defers`) is compiled without its active window:
    every tick of its cadence fires, and the dispatcher defers a fire outside the
    window to the window's next opening (:func:`delivery.policy.decide`).

    Args:
        row: a ``schedules`` row as a mapping (``RowMapping``) or with attributes
            (``Row``, ``ScheduleRow``).

    The stored ``anchor_at`` is the compiled anchor (``starts_at``, else the
    creation instant, rounded up to the minute), so passing it as the creation
    instant gives back the same anchor whatever edited the row since.
    """
    get = row.__getitem__ if isinstance(row, Mapping) else partial(getattr, row)
    cadence = json.loads(get("cadence_json"))
    if isinstance(cadence, dict) and "timezone" not in cadence:
        cadence = {**cadence, "timezone": get("timezone")}
    window_json = None if defers(row) else get("active_window_json")
    return compile_schedule(
        cadence,
        json.loads(window_json) if window_json else None,
        starts_at=get("starts_at"),
        ends_at=get("ends_at"),
        created_at=get("anchor_at"),
    )


# --- values crossing the store's boundary ---------------------------------------


class ClaimedSchedule(Protocol):
    """A claimed ``schedules`` row: the columns the planner and the writes read."""

    @property
    def id(self) -> str: ...
    @property
    def project_id(self) -> str: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def user_id(self) -> str: ...
    @property
    def cadence_json(self) -> str: ...
    @property
    def active_window_json(self) -> str | None: ...
    @property
    def timezone(self) -> str: ...
    @property
    def starts_at(self) -> datetime | None: ...
    @property
    def ends_at(self) -> datetime | None: ...
    @property
    def anchor_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...
    @property
    def next_fire_at(self) -> datetime:  # a due row has one
        ...
    @property
    def due_at(self) -> datetime | None: ...
    @property
    def last_fire_at(self) -> datetime | None: ...
    @property
    def version(self) -> int: ...
    @property
    def policy_json(self) -> str | None: ...


def _offset_s(instant: datetime, due_at: datetime | None) -> float:
    return 0.0 if due_at is None else (instant - due_at).total_seconds()


def pair_offset(row: ClaimedSchedule) -> timedelta:
    """
    How far the row's pair clock runs ahead of real time: ``next_fire_at - due_at``
    (``due_at`` is set only on an advanced pair's rows, from the pair's offset).
    """
    due_at = row.due_at
    # Most rows belong to no advanced pair; a batch asks this several times per row.
    return _NO_OFFSET if due_at is None else timedelta(seconds=_offset_s(row.next_fire_at, due_at))


_NO_OFFSET = timedelta(0)


class ScheduleRecords(Protocol):
    """
    Schedules as the API writes and reads them, within one (project, agent, user).

    Invariants: an update is a compare-and-set on ``version`` (the scheduler
    bumps it when it fires), so a write computed from a stale read changes
    nothing; a change to a schedule restages its staged fires in the same
    transaction, so no message is composed from the old state; a deletion
    removes its fires and their unpublished outbox entries with it.
    """

    async def insert_schedule(
        self,
        row: ScheduleRow | Mapping[str, Any],
        skips: Sequence[Skip] = (),
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        """
        Insert a new schedule row as given (a row, or its column values: every
        column), with ``skipped`` fire rows for ``skips`` (ticks its pair's
        advanced clock had passed; same transaction); with ``record`` (its
        ``Idempotency-Key`` answer) in that transaction too, unless that key
        already has a live record: then nothing is written and the outcome
        carries that record. With ``expected``, nothing is written either when
        the pair's clock offset is not that one (the outcome is ``moved``).
        """
        ...

    async def get_schedule(
        self, project_id: str, agent_id: str, user_id: str, schedule_id: str
    ) -> ScheduleRow | None:
        """One schedule of the (agent, user) pair, or ``None``."""
        ...

    async def list_schedules(
        self, project_id: str, agent_id: str, user_id: str
    ) -> list[ScheduleRow]:
        """Every schedule of the (agent, user) pair, oldest first."""
        ...

    async def update_schedule(
        self,
        row: ScheduleRow,
        changes: Mapping[str, Any],
        expected_version: int,
        *,
        now: datetime,
        drop_staged_after: datetime | None = None,
    ) -> bool:
        """Apply ``changes`` if the version is still ``expected_version``; whether it did."""
        ...

    async def delete_schedule(
        self, project_id: str, agent_id: str, user_id: str, schedule_id: str, *, now: datetime
    ) -> bool:
        """Delete a schedule and its fire history; whether it existed."""
        ...


@dataclass(frozen=True, slots=True)
class PlannedSchedule:
    """A claimed schedule and what the planner decided for it."""

    row: ClaimedSchedule
    plan: SchedulePlan


@dataclass(slots=True)
class AppliedPlans:
    """
    What :meth:`SchedulerStore.apply_plans` committed.

    Attributes:
        kept: schedules whose plan was written (unchanged since the claim).
        stale: schedules changed since the claim: nothing written, claim released.
        fire_ids: the ``fired`` fire rows inserted, in plan order; each has one
            ``fire.created`` outbox row.
        skipped: ``skipped`` fire rows inserted.
        conflicts: planned fires whose (schedule_id, fire_at) row already existed.
        next_release: the earliest fire instant after ``now`` among the fires
            inserted (staged ahead by a lookahead).
        handed: the fires of ``fire_ids`` whose outbox row was held for the
            in-process dispatcher (``available_at`` at the hand-off's end), as the
            refs it processes.
    """

    kept: frozenset[str] = frozenset()
    stale: list[str] = field(default_factory=list)
    fire_ids: list[FireId] = field(default_factory=list)
    skipped: int = 0
    conflicts: int = 0
    next_release: datetime | None = None
    handed: list[SourceRef] = field(default_factory=list)


class SchedulerStore(Protocol):
    """
    What the scheduler needs from the store.

    A claim is a lease: the rows are stamped ``claimed_by = owner`` and
    ``claimed_until``; a row whose lease has passed is claimable again, so a
    killed owner's work is picked up by itself. Claims made
    at the same time by several owners never return the same row.
    """

    async def claim_schedules(
        self, owner: str, *, now: datetime, due_by: datetime, lease_until: datetime, limit: int
    ) -> Sequence[ClaimedSchedule]:
        """
        Claim up to ``limit`` due schedules for ``owner`` and return them.

        Due: ``enabled``, ``next_fire_at <= due_by``, and unclaimed or with a
        lease that ended before ``now``; the earliest ``next_fire_at`` first. The
        claim commits before this returns; it stamps ``claimed_by = owner`` and
        ``claimed_until = lease_until`` and nothing else (``version`` is unchanged,
        so :meth:`apply_plans` can tell an API write made since).
        """
        ...

    async def apply_plans(
        self,
        owner: str,
        planned: Sequence[PlannedSchedule],
        *,
        now: datetime,
        hand_off: int = 0,
        held_until: datetime | None = None,
    ) -> AppliedPlans:
        """
        Write the plans of schedules ``owner`` claimed, in ONE transaction.

        In that transaction, for every schedule still claimed by ``owner``: its
        ``version`` is bumped (this locks it; an API write now waits). A schedule
        whose new version is not the claimed one + 1 was changed since the claim:
        it is ``stale``, nothing of its plan is written and its claim is released.
        For every other one: ``next_fire_at``, ``last_fire_at``, ``staged_fire_at``
        (its fire after ``now``, if any) and ``enabled`` are written (``updated_at``
        becomes ``now`` when the plan disables it) and the claim cleared; one fire
        row per planned fire and skip is inserted, unique on (schedule_id, fire_at)
        with the id :func:`~delivery.planning.fire_id` derives from that pair, an
        existing row being left alone (a
        ``conflict``); and one ``fire.created`` outbox row (msg id = fire id) is
        queued per ``fired`` row inserted, available at once when the fire lies
        after ``now`` and just before its instant otherwise. Either all of it
        commits or none. Replaying the same plans inserts nothing twice.

        With ``hand_off`` and ``held_until``, the outbox rows of the first
        ``hand_off`` fires inserted are instead available at ``held_until``: the
        caller hands those fires (``AppliedPlans.handed``) to a dispatcher in its
        own process, which stamps the rows sent when it writes their
        notifications; the relay publishes any it has not stamped by then.
        """
        ...

    async def claim_wakeups(
        self, owner: str, *, now: datetime, lease_until: datetime, limit: int
    ) -> Sequence[str]:
        """
        Claim up to ``limit`` due wakeups for ``owner`` and queue one ``wakeup.due`` each.

        Due: ``pending``, ``scheduled_at <= now``, and unclaimed or with a lease
        that ended before ``now``; the earliest first. In one transaction the
        claim is stamped and each wakeup's outbox row (msg id = wakeup id) is
        inserted, or re-armed (``sent_at`` cleared) if it exists, so a message
        that never reached the dispatcher goes out again. The wakeup stays
        ``pending``. Returns the ids claimed.
        """
        ...

    async def release_claims(self, *, owner: str | None) -> int:
        """
        Clear the claims of ``owner`` (every claim with ``None``) on schedules and
        wakeups, so the rows are claimable at once; how many rows were released.
        """
        ...


_AHEAD = timedelta(milliseconds=1)
"""How far before its fire instant a due fire's outbox entry is released (ordering only)."""

_UNCLAIMED: dict[str, Any] = {"claimed_by": None, "claimed_until": None}

# Statements are built once: SQLAlchemy caches their compiled form by identity.
_CLAIM_COLUMNS = (
    SCHEDULES.c.id,
    SCHEDULES.c.project_id,
    SCHEDULES.c.agent_id,
    SCHEDULES.c.user_id,
    SCHEDULES.c.cadence_json,
    SCHEDULES.c.active_window_json,
    SCHEDULES.c.timezone,
    SCHEDULES.c.starts_at,
    SCHEDULES.c.ends_at,
    SCHEDULES.c.anchor_at,
    SCHEDULES.c.updated_at,
    SCHEDULES.c.next_fire_at,
    SCHEDULES.c.due_at,
    SCHEDULES.c.last_fire_at,
    SCHEDULES.c.version,
    SCHEDULES.c.policy_json,
)

_CLAIMED_BY_OWNER = (
    SCHEDULES.c.id.in_(bindparam("ids", expanding=True)),
    SCHEDULES.c.claimed_by == bindparam("owner"),
)

_BUMP = (
    update(SCHEDULES)
    .where(*_CLAIMED_BY_OWNER)
    .values(version=SCHEDULES.c.version + 1)
    .returning(SCHEDULES.c.id, SCHEDULES.c.version)
)

_RELEASE = update(SCHEDULES).where(*_CLAIMED_BY_OWNER).values(_UNCLAIMED)

_WRITE_SCHEDULE = (
    update(SCHEDULES)
    .where(SCHEDULES.c.id == bindparam("b_id"), SCHEDULES.c.version == bindparam("b_version"))
    .values(
        next_fire_at=bindparam("b_next_fire_at"),
        due_at=bindparam("b_due_at"),
        last_fire_at=bindparam("b_last_fire_at"),
        staged_fire_at=bindparam("b_staged_fire_at"),
        enabled=bindparam("b_enabled"),
        updated_at=bindparam("b_updated_at"),
        claimed_by=bindparam("b_claimed_by"),
        claimed_until=bindparam("b_claimed_until"),
    )
)


class ScheduleStore(StoreBase):
    """
    :class:`SchedulerStore` and :class:`ScheduleRecords` on SQLite and PostgreSQL.

    On PostgreSQL claims select their rows ``FOR UPDATE SKIP LOCKED``, so
    replicas skip each other's rows instead of queueing on them; SQLite has one writer. On SQLite
    :meth:`apply_plans` is one call to the driver's thread for the whole
    transaction (:func:`delivery.store.direct.write`): a burst's staging
    shares the writer with the dispatcher composing ahead, and round trips
    through a busy event loop while holding the lock idled the writer for
    both.

    Args:
        engine: the store's engine (schema present).
        subjects: the NATS subjects of this deployment (outbox rows name them).
        capabilities: what the database can do; from ``engine`` by default.
    """

    def __init__(
        self, engine: Engine, subjects: Subjects, *, capabilities: Capabilities | None = None
    ) -> None:
        super().__init__(engine)
        self.subjects = subjects
        self._caps = capabilities or self.capabilities
        # One call to SQLite's driver thread per operation (delivery.store.steps).
        self._runner = Runner(engine, reader=self._reader)
        self._insert_fires = insert_ignoring(
            self._caps.dialect, FIRES, ("schedule_id", "fire_at")
        ).returning(FIRES.c.id)
        # delivery.store.bulk.insert_outbox's statement, built once for the
        # synchronous Core writes of apply_plans.
        self._insert_outbox = insert_ignoring(self._caps.dialect, OUTBOX, ("msg_id",)).returning(
            OUTBOX.c.msg_id
        )
        self._rearm_outbox = self._caps.insert(OUTBOX).on_conflict_do_update(
            index_elements=["msg_id"], set_={"sent_at": None}
        )

    # --- schedules as the API writes them ---------------------------------------

    async def insert_schedule(
        self,
        row: ScheduleRow | Mapping[str, Any],
        skips: Sequence[Skip] = (),
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        """
        Insert a new schedule row as given, its ``created`` change and a ``skipped``
        fire row per ``skips`` (same transaction); see :meth:`Schedules.insert_schedule`.
        """
        values = row_values(row)
        sid = values["id"]
        change = {
            "id": change_id(values["version"]),
            "schedule_id": sid,
            "project_id": values["project_id"],
            "agent_id": values["agent_id"],
            "user_id": values["user_id"],
            "kind": "created",
            "fields_json": "[]",
            "timezone": values["timezone"],
            "version": values["version"],
            "changed_at": values["created_at"],
        }
        inserts = [InsertRows(SCHEDULES, [values]), InsertRows(SCHEDULE_CHANGES, [change])]
        if skips:
            inserts.append(
                InsertRows(
                    FIRES,
                    [
                        {
                            "id": fire_id(sid, skip.fire_at),
                            "schedule_id": sid,
                            "project_id": values["project_id"],
                            "agent_id": values["agent_id"],
                            "user_id": values["user_id"],
                            "fire_at": skip.fire_at,
                            "status": "skipped",
                            "skip_reason": skip.reason,
                            "created_at": values["created_at"],
                        }
                        for skip in skips
                    ],
                )
            )
        return await write_recorded(
            self._runner, inserting(*inserts), record, guard=offset_guard(expected)
        )

    async def get_schedule(
        self, project_id: str, agent_id: str, user_id: str, schedule_id: str
    ) -> ScheduleRow | None:
        """One schedule of the (agent, user) pair, or ``None``."""
        owner = owned(SCHEDULES, project_id, agent_id=agent_id, user_id=user_id, id=schedule_id)
        async with self.read() as conn:
            row = (await conn.execute(select(SCHEDULES).where(*owner))).one_or_none()
        return None if row is None else ScheduleRow(**row._mapping)

    async def list_schedules(
        self, project_id: str, agent_id: str, user_id: str
    ) -> list[ScheduleRow]:
        """Every schedule of the (agent, user) pair, oldest first."""
        stmt = (
            select(SCHEDULES)
            .where(*owned(SCHEDULES, project_id, agent_id=agent_id, user_id=user_id))
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
                *owned(SCHEDULES, row.project_id, id=row.id),
                SCHEDULES.c.version == expected_version,
            )
            .values(**changes)
        )
        async with self.write() as conn:
            result = await conn.execute(stmt)
            if not result.rowcount:
                return False
            await _record_change(
                conn,
                row,
                _change_kind(row, changes),
                sorted(
                    k
                    for k, v in changes.items()
                    if k not in _BOOKKEEPING and getattr(row, k, None) != v
                ),
                changes.get("timezone", row.timezone),
                int(changes.get("version", row.version)),
                now,
            )
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
        Delete a schedule and its fire history (deleting removes "all associated
        fire history"); notifications already produced stay in the queue.

        Returns:
            Whether a schedule was deleted.
        """
        owner = owned(SCHEDULES, project_id, agent_id=agent_id, user_id=user_id, id=schedule_id)
        its_fires = (FIRES.c.schedule_id == schedule_id, *owned(FIRES, project_id))
        async with self.write() as conn:
            gone = (
                await conn.execute(select(SCHEDULES.c.timezone, SCHEDULES.c.version).where(*owner))
            ).one_or_none()
            result = await conn.execute(delete(SCHEDULES).where(*owner))
            if not result.rowcount or gone is None:
                return False
            await conn.execute(
                SCHEDULE_CHANGES.insert().values(
                    id=change_id(gone.version + 1),
                    schedule_id=schedule_id,
                    project_id=project_id,
                    agent_id=agent_id,
                    user_id=user_id,
                    kind="deleted",
                    fields_json="[]",
                    timezone=gone.timezone,
                    version=gone.version + 1,
                    changed_at=now,
                )
            )
            # A staged fire's message may be composed already: drop it, and have
            # the dispatcher drop any a racing dispatcher writes (it finds no fire).
            await self._restage(conn, now, *its_fires)
            # Entries not yet published go too: a fire staged by the lookahead
            # (or one the relay has not reached) must not reach the dispatcher.
            await conn.execute(
                delete(OUTBOX).where(
                    OUTBOX.c.sent_at.is_(None),
                    OUTBOX.c.msg_id.in_(select(FIRES.c.id).where(*its_fires)),
                )
            )
            await conn.execute(delete(FIRES).where(*its_fires))
        return True

    # --- claims -----------------------------------------------------------------

    async def claim_schedules(
        self, owner: str, *, now: datetime, due_by: datetime, lease_until: datetime, limit: int
    ) -> Sequence[ClaimedSchedule]:
        """See :meth:`SchedulerStore.claim_schedules`."""
        s = SCHEDULES.c
        unclaimed = or_(s.claimed_until.is_(None), s.claimed_until < now)
        due = (
            select(s.id)
            .where(s.enabled.is_(True), s.next_fire_at <= due_by, s.due_at.is_(None), unclaimed)
            .order_by(s.next_fire_at)
            .limit(limit)
        )
        # An advanced pair's rows are due by their real instant; no lookahead for
        # them (a fire staged ahead would be promoted on the real clock).
        shifted = (
            select(s.id)
            .where(s.enabled.is_(True), s.due_at <= now, unclaimed)
            .order_by(s.due_at)
            .limit(limit)
        )
        if not (await any_row(self.engine, due) or await any_row(self.engine, shifted)):
            return []
        if self._caps.driver_thread:
            return await direct.write(
                self.engine,
                partial(
                    _claim_direct,
                    owner=owner,
                    now=now,
                    due_by=due_by,
                    lease_until=lease_until,
                    limit=limit,
                ),
            )
        claim = self._claim(SCHEDULES, due, shifted, owner=owner, lease_until=lease_until)
        async with write_transaction(self.engine) as conn:
            rows: Sequence[ClaimedSchedule] = (
                await conn.execute(claim.returning(*_CLAIM_COLUMNS))
            ).all()
        return rows

    async def claim_wakeups(
        self, owner: str, *, now: datetime, lease_until: datetime, limit: int
    ) -> Sequence[str]:
        """See :meth:`SchedulerStore.claim_wakeups`."""
        w = WAKEUPS.c
        unclaimed = or_(w.claimed_until.is_(None), w.claimed_until < now)
        due = (
            select(w.id)
            .where(w.status == "pending", w.scheduled_at <= now, w.due_at.is_(None), unclaimed)
            .order_by(w.scheduled_at)
            .limit(limit)
        )
        shifted = (
            select(w.id)
            .where(w.status == "pending", w.due_at <= now, unclaimed)
            .order_by(w.due_at)
            .limit(limit)
        )
        if not (await any_row(self.engine, due) or await any_row(self.engine, shifted)):
            return []
        claim = self._claim(WAKEUPS, due, shifted, owner=owner, lease_until=lease_until)
        subject = self.subjects.wakeup_due
        async with write_transaction(self.engine) as conn:
            rows = (await conn.execute(claim.returning(w.id, w.scheduled_at, w.due_at))).all()
            if not rows:
                return []
            outbox = [
                {
                    "subject": subject,
                    "msg_id": row.id,
                    "payload": WakeupDue(
                        wakeup_id=row.id,
                        fire_at=row.scheduled_at,
                        offset_s=_offset_s(row.scheduled_at, row.due_at),
                    ).model_dump_json(),
                    "created_at": now,
                    "available_at": now,
                    "sent_at": None,
                }
                for row in rows
            ]
            await conn.execute(self._rearm_outbox, outbox)
        return [row.id for row in rows]

    async def release_claims(self, *, owner: str | None) -> int:
        """See :meth:`SchedulerStore.release_claims`."""
        released = 0
        async with write_transaction(self.engine) as conn:
            for table in (SCHEDULES, WAKEUPS):
                stmt = update(table).where(table.c.claimed_by.is_not(None))
                if owner is not None:
                    stmt = stmt.where(table.c.claimed_by == owner)
                result = await conn.execute(stmt.values(_UNCLAIMED))
                released += int(result.rowcount or 0)
        return released

    def _claim(self, table: Table, *due: Select[Any], owner: str, lease_until: datetime) -> Any:
        """The ``UPDATE`` stamping ``owner``'s lease on the rows the ``due`` queries select."""
        if self._caps.skip_locked:
            due = tuple(d.with_for_update(skip_locked=True) for d in due)
        return (
            update(table)
            .where(or_(*(table.c.id.in_(d.scalar_subquery()) for d in due)))
            .values(claimed_by=owner, claimed_until=lease_until)
        )

    # --- writes -----------------------------------------------------------------

    async def apply_plans(
        self,
        owner: str,
        planned: Sequence[PlannedSchedule],
        *,
        now: datetime,
        hand_off: int = 0,
        held_until: datetime | None = None,
    ) -> AppliedPlans:
        """See :meth:`SchedulerStore.apply_plans`."""
        if not planned:
            return AppliedPlans()
        held = (hand_off, held_until) if hand_off > 0 and held_until is not None else None
        apply = partial(self._apply, owner=owner, planned=planned, now=now, held=held)
        if self._caps.driver_thread:
            return await direct.write(self.engine, lambda db: apply(_DirectWrites(db)))
        core = partial(
            _CoreWrites, insert_fires=self._insert_fires, insert_outbox=self._insert_outbox
        )
        async with write_transaction(self.engine) as conn:
            return await conn.run_sync(lambda sync: apply(core(sync)))

    def _apply(
        self,
        writes: "_Writes",
        *,
        owner: str,
        planned: Sequence[PlannedSchedule],
        now: datetime,
        held: tuple[int, datetime] | None = None,
    ) -> AppliedPlans:
        """:meth:`apply_plans` inside its transaction, on either set of writes."""
        # The version bump comes first: it locks the rows (on SQLite the transaction's
        # write lock already does, and the bump is only read here). Bumping a stale
        # row once more is harmless: a version only has to change.
        bumped = writes.bump_versions([p.row.id for p in planned], owner)
        kept = [p for p in planned if bumped.get(p.row.id) == p.row.version + 1]
        applied = AppliedPlans(
            kept=frozenset(p.row.id for p in kept),
            stale=[p.row.id for p in planned if bumped.get(p.row.id) != p.row.version + 1],
        )
        if applied.stale:
            # Give the changed rows back at once instead of at lease expiry.
            writes.release(applied.stale, owner)
        if not kept:
            return applied
        writes.write_states(_states(kept, now))
        fire_rows = _fire_rows(kept, now)
        inserted = writes.insert_fires(fire_rows)
        offsets = {p.row.id: pair_offset(p.row) for p in kept if p.row.due_at is not None}
        outbox, refs = self._outbox_rows(fire_rows, inserted, now, applied, offsets)
        if held is not None:
            count, until = held
            # Held until the in-process dispatcher has had its chance; the relay
            # publishes whatever it has not stamped sent by then.
            for entry in outbox[:count]:
                entry["available_at"] = until
            applied.handed = refs[:count]
        writes.insert_outbox(outbox)
        return applied

    def _outbox_rows(
        self,
        fire_rows: list[dict[str, Any]],
        inserted: set[str],
        now: datetime,
        applied: AppliedPlans,
        offsets: Mapping[str, timedelta],
    ) -> tuple[list[dict[str, Any]], list[SourceRef]]:
        """
        One ``fire.created`` per inserted fire, and its ref (what the message
        names); counts the fires into ``applied``.

        ``offsets``: schedule id -> its pair's clock offset, for the schedules of
        advanced pairs (their fire instants are on the pair's clock).
        """
        outbox_rows: list[dict[str, Any]] = []
        refs: list[SourceRef] = []
        subject = self.subjects.fire_created
        for fire in fire_rows:
            if fire["status"] != "fired":
                continue
            if fire["id"] not in inserted:
                applied.conflicts += 1
                continue
            applied.fire_ids.append(fire["id"])
            offset = offsets.get(fire["schedule_id"])
            payload = FireCreated(
                fire_id=fire["id"],
                schedule_id=fire["schedule_id"],
                fire_at=fire["fire_at"],
                offset_s=0.0 if offset is None else offset.total_seconds(),
            )
            refs.append(SourceRef(SourceKind.SCHEDULE, fire["id"], offset_s=payload.offset_s))
            if offset is not None:
                # Planned on the pair's clock without lookahead: due now, never staged.
                outbox_rows.append(
                    {
                        "subject": subject,
                        "msg_id": fire["id"],
                        "payload": payload.model_dump_json(),
                        "created_at": now,
                        "available_at": now,
                    }
                )
                continue
            if fire["fire_at"] > now:
                # The relay must run at the instant to promote the staged
                # notification the dispatcher composes meanwhile.
                applied.next_release = earliest(applied.next_release, fire["fire_at"])
            outbox_rows.append(
                {
                    "subject": subject,
                    "msg_id": fire["id"],
                    "payload": payload.model_dump_json(),
                    "created_at": now,
                    # Published at once, even when staged ahead: the dispatcher
                    # composes it during the lookahead (delivery.store.staging). A fire
                    # planned late sorts just before its instant, so the relay
                    # publishes it ahead of the notification.created entries
                    # that instant released (a burst's promoted messages).
                    "available_at": now if fire["fire_at"] > now else fire["fire_at"] - _AHEAD,
                }
            )
        # Counted from the rows, not rowcount: asyncpg's executemany rowcount is
        # not reliable, and each msg_id is a fire id inserted just before.
        applied.skipped = len(inserted) - len(applied.fire_ids)
        return outbox_rows, refs


_CLAIM_SQL = (
    'UPDATE "schedules" SET "claimed_by" = ?, "claimed_until" = ? WHERE "id" IN ('
    'SELECT "id" FROM "schedules" WHERE "enabled" IS 1 AND "next_fire_at" <= ? '
    'AND "due_at" IS NULL AND ("claimed_until" IS NULL OR "claimed_until" < ?) '
    'ORDER BY "next_fire_at" LIMIT ?'
    ') OR "id" IN ('
    'SELECT "id" FROM "schedules" WHERE "enabled" IS 1 AND "due_at" <= ? '
    'AND ("claimed_until" IS NULL OR "claimed_until" < ?) ORDER BY "due_at" LIMIT ?'
    ') RETURNING "id", "project_id", "agent_id", "user_id", "cadence_json", '
    '"active_window_json", "timezone", "starts_at", "ends_at", "anchor_at", "updated_at", '
    '"next_fire_at", "due_at", "last_fire_at", "version", "policy_json"'
)
"""
The claim of :meth:`ScheduleStore.claim_schedules` as SQLite runs it: the statement
SQLAlchemy compiles from ``_claim`` (the same two index ranges), written out so the
claim is one call to the driver's thread whose rows skip SQLAlchemy's result
processing (1,000 rows of 16 columns per tick in a burst).
"""


class _ClaimedRow(NamedTuple):
    """A claimed row read on the driver's thread: the columns of ``_CLAIM_COLUMNS``."""

    id: str
    project_id: str
    agent_id: str
    user_id: str
    cadence_json: str
    active_window_json: str | None
    timezone: str
    starts_at: datetime | None
    ends_at: datetime | None
    anchor_at: datetime
    updated_at: datetime
    next_fire_at: datetime
    due_at: datetime | None
    last_fire_at: datetime | None
    version: int
    policy_json: str | None

    @property
    def _mapping(self) -> dict[str, Any]:
        # As a SQLAlchemy ``Row`` of the Core form offers it.
        return self._asdict()


def _claim_direct(
    db: sqlite3.Connection,
    *,
    owner: str,
    now: datetime,
    due_by: datetime,
    lease_until: datetime,
    limit: int,
) -> list[_ClaimedRow]:
    c = direct.codec(SCHEDULES)
    [(lease, stored_now, stored_due_by)] = c.params(
        [{"claimed_until": lease_until, "updated_at": now, "next_fire_at": due_by}],
        ["claimed_until", "updated_at", "next_fire_at"],
    )
    cursor = db.execute(
        _CLAIM_SQL,
        (owner, lease, stored_due_by, stored_now, limit, stored_now, stored_now, limit),
    )
    read = c.only(_ClaimedRow._fields)
    return [_ClaimedRow(**read.row(values)) for values in cursor.fetchall()]


def _states(kept: list[PlannedSchedule], now: datetime) -> list[dict[str, Any]]:
    return [_state(p, now, pair_offset(p.row)) for p in kept]


def _state(p: PlannedSchedule, real_now: datetime, offset: timedelta) -> dict[str, Any]:
    # An advanced pair's row lives on its clock: instants written are pair
    # instants, and due_at is the next fire's real instant.
    now = real_now + offset
    return {
        "next_fire_at": p.plan.next_fire_at,
        "due_at": due_in_real_time(p.plan.next_fire_at, offset),
        "last_fire_at": p.plan.last_fire_at,
        # At most one fire lies ahead (the scheduler's lookahead is under a
        # minute); the API shows it.
        "staged_fire_at": next((at for at in p.plan.fires if at > now), None),
        "enabled": not p.plan.disable,
        # Disabling (ends_at reached) changes what the API shows, so it is an
        # update; otherwise the claimed value is written back unchanged. A
        # column of the UPDATE that runs anyway: no extra statement.
        "updated_at": now if p.plan.disable else p.row.updated_at,
        **_UNCLAIMED,
        # The version the apply gives the row: matched by the UPDATE where the bump
        # already ran (PostgreSQL; belt and braces, the row is locked), set by it where
        # the bump was only read (SQLite, whose transaction excludes other writers).
        "id": p.row.id,
        "version": p.row.version + 1,
    }


def _fire_rows(kept: list[PlannedSchedule], now: datetime) -> list[dict[str, Any]]:
    fire_rows: list[dict[str, Any]] = []
    for p in kept:
        row = p.row
        base = {
            "schedule_id": row.id,
            "project_id": row.project_id,
            "agent_id": row.agent_id,
            "user_id": row.user_id,
            # On the pair's clock, as everything of an advanced pair is.
            "created_at": now + pair_offset(row),
        }
        fire_rows.extend(
            {
                **base,
                "id": fire_id(row.id, at),
                "fire_at": at,
                "status": "fired",
                "skip_reason": None,
            }
            for at in p.plan.fires
        )
        fire_rows.extend(
            {
                **base,
                "id": fire_id(row.id, skip.fire_at),
                "fire_at": skip.fire_at,
                "status": "skipped",
                "skip_reason": skip.reason,
            }
            for skip in p.plan.skips
        )
    return fire_rows


# --- the two forms of apply_plans' writes -----------------------------------------


class _Writes(Protocol):
    """
    The statements of :meth:`ScheduleStore.apply_plans`, inside its one transaction.

    Every id given to :meth:`bump_versions` is then given to exactly one of
    :meth:`release` (stale) or :meth:`write_states` (kept): where the bump is only
    read, those two write it, so an id given to neither would keep its old version.
    """

    def bump_versions(self, ids: list[str], owner: str) -> dict[str, int]:
        """
        Bump the version of ``ids`` still claimed by ``owner`` (or, where the
        transaction already excludes every other writer, only read what it will
        be and leave the bump to :meth:`write_states`); id -> new version.
        """
        ...

    def release(self, ids: list[str], owner: str) -> None:
        """
        Clear ``owner``'s claim on ``ids`` (and bump their version, where
        :meth:`bump_versions` only read it).
        """
        ...

    def write_states(self, states: list[dict[str, Any]]) -> None:
        """Write each state (its new ``version`` included) to the schedule of its ``id``."""
        ...

    def insert_fires(self, rows: list[dict[str, Any]]) -> set[str]:
        """Insert fire rows, leaving existing (schedule_id, fire_at) alone; ids inserted."""
        ...

    def insert_outbox(self, rows: list[dict[str, Any]]) -> None:
        """Queue outbox rows, leaving an existing msg_id alone."""
        ...


class _DirectWrites:
    """:class:`_Writes` on SQLite's driver thread (:mod:`delivery.store.direct`)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def bump_versions(self, ids: list[str], owner: str) -> dict[str, int]:
        # Read, not written: the transaction is BEGIN IMMEDIATE, so no other writer
        # can change these rows before it commits, and write_states sets the new
        # version in the UPDATE it runs anyway. Writing each row once instead of
        # twice per fire saves an UPDATE of the claimed batch on every tick.
        bumped: dict[str, int] = {}
        for start in range(0, len(ids), direct.MAX_VARIABLES):
            chunk = ids[start : start + direct.MAX_VARIABLES]
            marks = direct.marks(len(chunk))
            cursor = self.db.execute(
                "SELECT id, version + 1 FROM schedules "  # noqa: S608 (marks only)
                f"WHERE id IN ({marks}) AND claimed_by = ?",
                (*chunk, owner),
            )
            bumped.update(cursor.fetchall())
        return bumped

    def release(self, ids: list[str], owner: str) -> None:
        # The bump bump_versions left to write_states, for rows no state is written to
        # (the same rows the UPDATE form bumps: those still claimed by ``owner``).
        for start in range(0, len(ids), direct.MAX_VARIABLES):
            chunk = ids[start : start + direct.MAX_VARIABLES]
            marks = direct.marks(len(chunk))
            self.db.execute(
                "UPDATE schedules SET version = version + 1, claimed_by = NULL, "  # noqa: S608
                f"claimed_until = NULL WHERE id IN ({marks}) AND claimed_by = ?",
                (*chunk, owner),
            )

    def write_states(self, states: list[dict[str, Any]]) -> None:
        # bump_versions only read the versions: the bump is this UPDATE's, from the
        # version claimed (one less than the state's) to the state's.
        if not states:
            return
        c = direct.codec(SCHEDULES)
        sets = [name for name in states[0] if name != "id"]
        assignments = ", ".join(f'"{name}" = ?' for name in sets)
        params = c.params(states, [*sets, "id"])
        at_version = sets.index("version")
        self.db.executemany(
            f"UPDATE schedules SET {assignments} WHERE id = ? AND version = ?",  # noqa: S608
            [(*p, p[at_version] - 1) for p in params],
        )

    def insert_fires(self, rows: list[dict[str, Any]]) -> set[str]:
        if not rows:
            return set()
        # No RETURNING with executemany: what existed before is read in the same
        # transaction (a fire id is derived from its unique key).
        ids = [r["id"] for r in rows]
        had = {r["id"] for r in direct.select_in(self.db, FIRES, "id", ids, columns=["id"])}
        direct.insert_ignoring_duplicates(self.db, FIRES, rows, unique=["schedule_id", "fire_at"])
        return set(ids) - had

    def insert_outbox(self, rows: list[dict[str, Any]]) -> None:
        direct.insert_ignoring_duplicates(self.db, OUTBOX, rows, unique="msg_id")


class _CoreWrites:
    """:class:`_Writes` as SQLAlchemy Core statements; any dialect with RETURNING."""

    def __init__(self, conn: Connection, *, insert_fires: Any, insert_outbox: Any) -> None:
        self.conn = conn
        self._insert_fires = insert_fires
        self._insert_outbox = insert_outbox

    def bump_versions(self, ids: list[str], owner: str) -> dict[str, int]:
        rows: Sequence[Row[Any]] = self.conn.execute(_BUMP, {"ids": ids, "owner": owner}).all()
        return {r.id: r.version for r in rows}

    def release(self, ids: list[str], owner: str) -> None:
        self.conn.execute(_RELEASE, {"ids": ids, "owner": owner})

    def write_states(self, states: list[dict[str, Any]]) -> None:
        self.conn.execute(
            _WRITE_SCHEDULE, [{f"b_{k}": v for k, v in state.items()} for state in states]
        )

    def insert_fires(self, rows: list[dict[str, Any]]) -> set[str]:
        if not rows:
            return set()
        # executemany + RETURNING batches through SQLAlchemy's insertmanyvalues.
        return set(self.conn.execute(self._insert_fires, rows).scalars().all())

    def insert_outbox(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.conn.execute(self._insert_outbox, rows)


_BOOKKEEPING = frozenset(
    {
        "version",
        "updated_at",
        "next_fire_at",
        "claimed_by",
        "claimed_until",
        "staged_fire_at",
        "anchor_at",
        "cadence_type",
    }
)
"""Columns a write sets that are not the client's change (left out of ``fields_json``)."""


def change_id(version: int) -> str:
    """
    A schedule change's id: the version first, so two changes of one schedule
    stamped at the same instant still sort in the order they were made.
    """
    return f"chg_{version:010d}_{secrets.token_hex(8)}"


def _change_kind(row: ScheduleRow, changes: Mapping[str, Any]) -> str:
    """``disabled`` / ``enabled`` when the write flips ``enabled``, else ``updated``."""
    if "enabled" in changes and bool(changes["enabled"]) != bool(row.enabled):
        return "enabled" if changes["enabled"] else "disabled"
    return "updated"


def change_row(
    row: ScheduleRow, kind: str, fields: list[str], timezone: str, version: int, at: datetime
) -> dict[str, Any]:
    """The ``schedule_changes`` row that records ``kind`` of ``row``."""
    return {
        "id": change_id(version),
        "schedule_id": row.id,
        "project_id": row.project_id,
        "agent_id": row.agent_id,
        "user_id": row.user_id,
        "kind": kind,
        "fields_json": canonical_json(fields),
        "timezone": timezone,
        "version": version,
        "changed_at": at,
    }


async def _record_change(
    conn: AsyncConnection,
    row: ScheduleRow,
    kind: str,
    fields: list[str],
    timezone: str,
    version: int,
    at: datetime,
) -> None:
    # In the caller's transaction: the history holds a change exactly when the
    # schedule write it describes committed.
    await conn.execute(
        SCHEDULE_CHANGES.insert().values(**change_row(row, kind, fields, timezone, version, at))
    )
