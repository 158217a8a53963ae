"""
Advance-time in the store: the pairs' clock offsets, what an advance reads, its
one write transaction, and the ``async: true`` jobs.

Every write here is reachable from the API, so each runs in
:func:`~delivery.store.engine.write_transaction` and joins a request's unit of
work (``Idempotency-Key``). Not a hot path: Core statements on both databases.
"""

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from sqlalchemy import ColumnElement, Table, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.errors import ConflictError
from delivery.store import common
from delivery.store.common import owned, owned_values
from delivery.store.engine import any_row, write_transaction
from delivery.store.notifications import (
    NotificationBatch,
    Written,
    writing,
)
from delivery.store.policy import LIVE
from delivery.store.staging import STAGED
from delivery.store.steps import Runner, SelectWhere, run_core, selecting
from delivery.store.tables import FIRES, JOBS, NOTIFICATIONS, OFFSETS, OUTBOX, SCHEDULES, WAKEUPS
from delivery.store.tables import INVENTORY as ITEMS

NOT_RESUMABLE: Final = "interrupted by a restart and not resumable; advance again"
"""The error of a lapsed job that :meth:`AdvanceStore.claim_lapsed_jobs` fails."""


@dataclass(frozen=True, slots=True)
class Pair:
    """Whose clock moves: the key of ``clock_offsets``."""

    project_id: str
    agent_id: str
    user_id: str


def due_in_real_time(instant: datetime | None, offset: timedelta) -> datetime | None:
    """
    The ``due_at`` of a row whose ``instant`` is on a pair's clock: when it is due
    in real time (``instant - offset``), or ``None`` when the pair is not advanced
    (the instant itself is due in real time; the scheduler's main index serves it).
    """
    if instant is None or not offset:
        return None
    return instant - offset


@dataclass(frozen=True, slots=True)
class JobClaim:
    """A runner's hold on a ``running`` job: the job, the call, and who holds the lease."""

    id: str
    owner: str
    pair: Pair
    hours: float


class JobLost(Exception):
    """The job's lease passed to another runner (ours lapsed): this run must not commit."""


@dataclass(frozen=True, slots=True)
class PairState:
    """
    What an advance of one pair plans from (every column of each row).

    Attributes:
        schedules: the pair's enabled schedules, by id.
        wakeups: the pair's pending wakeups in the window, by (``scheduled_at``, id).
        items: the inventory items those schedules and wakeups name, by id.
    """

    schedules: list[Mapping[str, Any]]
    wakeups: list[Mapping[str, Any]]
    items: dict[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class AdvanceWrite:
    """
    Everything one advance writes, planned and composed before the transaction.

    Attributes:
        old_offset_s: the offset the plan read (``None``: the pair had none).
        new_offset_s: the offset to set.
        now: the real instant of the advance (``updated_at`` of the offset).
        fires: ``fires`` rows (``FireRow`` columns), fired and skipped.
        schedule_moves: per schedule: ``id``, the ``version`` the plan read,
            and the new ``next_fire_at``, ``last_fire_at``, ``staged_fire_at``
            and ``enabled``.
        notifications: the composed notifications (advance-time's are simulated).
    """

    pair: Pair
    old_offset_s: float | None
    new_offset_s: float
    now: datetime
    fires: Sequence[Mapping[str, Any]]
    schedule_moves: Sequence[Mapping[str, Any]]
    notifications: NotificationBatch


@dataclass(frozen=True, slots=True)
class ClaimedJobs:
    """What :meth:`AdvanceStore.claim_lapsed_jobs` did: jobs taken over, and job ids failed."""

    claims: list[JobClaim]
    abandoned: list[str]


class AdvanceStore(Protocol):
    """What advance-time and its job queue rely on."""

    async def clock_offset(self, pair: Pair) -> float | None:
        """The pair's offset in seconds, ``None`` when it was never advanced."""
        ...

    async def reset_clock(self, pair: Pair) -> float | None:
        """
        Put the pair back on real time, in ONE transaction: delete its offset, clear
        ``due_at`` of its schedules and pending wakeups (their instants, kept as they
        are, are now due in real time), move its live messages' deadlines and held
        messages' releases back onto real time, and bump its schedules' versions (a
        scheduler claim planned on the old clock is then stale and writes nothing). Returns
        the offset it had (``None``: never advanced).
        """
        ...

    async def pair_state(self, pair: Pair, start: datetime, end: datetime) -> PairState:
        """The pair's state for a window ``[start, end)`` (no transaction: the write re-checks)."""
        ...

    async def commit_advance(
        self,
        write: AdvanceWrite,
        *,
        job: JobClaim | None = None,
        job_result: Callable[[Written], Mapping[str, Any]] | None = None,
    ) -> Written:
        """
        Write one advance in ONE transaction, all of it or nothing:

        1. compare-and-set the pair's offset from ``old_offset_s`` to ``new_offset_s``;
        2. apply each schedule move only if the row still has the version read
           (the API or a scheduler replica changing it meanwhile wins; the fire
           ids still dedupe), bumping the version;
        3. set ``due_at`` of every enabled schedule and pending wakeup of the
           pair from the new offset (their instants stay on the pair's clock;
           the scheduler claims them when real time reaches ``due_at``),
           bumping the schedules' versions under a row lock so a scheduler
           claim planned on the old offset turns stale;
        4. insert the fires, skipping any already recorded (unique on
           ``schedule_id``, ``fire_at``);
        5. write the notifications as
           :meth:`~delivery.store.notifications.NotificationStore.write_notifications`
           does (:func:`~delivery.store.notifications.writing`), the dispatcher's
           policy decisions with them;
        6. move the deadlines and held releases of the pair's other live
           messages, stored in real time, by the change of offset (they stay put
           on its clock);
        7. mark ``job`` ``succeeded`` with ``job_result`` of what was written,
           so a job still ``running`` after a crash is one whose advance never
           committed.

        Raises:
            ConflictError: the offset moved since it was read (a concurrent advance).
            JobLost: ``job`` is no longer held by its owner.
        """
        ...

    async def create_job(
        self,
        job_id: str,
        pair: Pair,
        hours: float,
        now: datetime,
        *,
        owner: str,
        lease_until: datetime,
        forget_before: datetime,
    ) -> JobClaim:
        """
        Record a ``running`` job that ``owner`` holds until ``lease_until``, and
        delete the jobs started before ``forget_before`` (unknown by then anyway).
        """
        ...

    async def renew_lease(self, job: JobClaim, until: datetime) -> bool:
        """Extend ``job``'s lease; ``False`` when it is no longer held (it ended or was taken)."""
        ...

    async def fail_job(self, job: JobClaim, now: datetime, error: str) -> None:
        """
        Mark ``job`` ``failed`` with ``error`` and end its lease.

        Raises:
            JobLost: ``job`` is no longer held by its owner; nothing was written.
        """
        ...

    async def release_leases(self) -> int:
        """End the lease of every ``running`` job; how many there are."""
        ...

    async def claim_lapsed_jobs(
        self,
        now: datetime,
        *,
        owner: str,
        lease_until: datetime,
        expired_before: datetime,
        limit: int,
    ) -> ClaimedJobs:
        """
        Take over up to ``limit`` ``running`` jobs whose lease is unset or before
        ``now``, oldest first, in one transaction (``FOR UPDATE SKIP LOCKED``:
        replicas claim different jobs). Those started before ``expired_before``
        or without their hours recorded are failed (:data:`NOT_RESUMABLE`); the
        others are leased to ``owner`` until ``lease_until``. Reads before it
        writes: with nothing lapsed, no write transaction is opened.
        """
        ...

    async def get_job(self, project_id: str, job_id: str) -> Mapping[str, Any] | None:
        """The job row (every column) if it is ``project_id``'s."""
        ...


def _held(job: JobClaim) -> ColumnElement[bool]:
    return (JOBS.c.id == job.id) & (JOBS.c.status == "running") & (JOBS.c.lease_owner == job.owner)


def _mine(table: Table, pair: Pair) -> list[ColumnElement[bool]]:
    return owned(table, pair.project_id, agent_id=pair.agent_id, user_id=pair.user_id)


async def _move_offset(conn: AsyncConnection, write: AdvanceWrite) -> None:
    """Compare-and-set the pair's offset (ConflictError: another advance committed first)."""
    pair = write.pair
    if write.old_offset_s is None:
        key = {"project_id": pair.project_id, "agent_id": pair.agent_id, "user_id": pair.user_id}
        row = {**key, "offset_s": write.new_offset_s, "updated_at": write.now}
        moved = await common.insert_ignoring_duplicates(conn, OFFSETS, [row], unique=list(key))
    else:
        result = await conn.execute(
            update(OFFSETS)
            .where(*_mine(OFFSETS, pair), OFFSETS.c.offset_s == write.old_offset_s)
            .values(offset_s=write.new_offset_s, updated_at=write.now)
        )
        moved = result.rowcount
    if moved != 1:
        raise ConflictError("", "a concurrent advance-time moved this clock first")


async def _end_job(
    conn: AsyncConnection,
    job: JobClaim,
    now: datetime,
    *,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """``succeeded`` with ``result``, or ``failed`` with ``error`` (JobLost: not ours)."""
    changed = await conn.execute(
        update(JOBS)
        .where(_held(job))
        .values(
            status="failed" if error is not None else "succeeded",
            result_json=None if result is None else json.dumps(result, separators=(",", ":")),
            error=error,
            updated_at=now,
            lease_owner=None,
            lease_until=None,
        )
    )
    if changed.rowcount != 1:
        raise JobLost(job.id)


async def _shift_rows(conn: AsyncConnection, pair: Pair, offset: timedelta) -> None:
    """Every live row of ``pair`` gets the ``due_at`` of ``offset`` (see ``commit_advance``)."""
    s, w = SCHEDULES.c, WAKEUPS.c
    schedules = (
        await conn.execute(
            select(s.id, s.next_fire_at).where(*_mine(SCHEDULES, pair), s.enabled.is_(True))
        )
    ).all()
    for schedule_id, next_fire_at in schedules:
        await conn.execute(
            update(SCHEDULES)
            .where(s.id == schedule_id)
            .values(due_at=due_in_real_time(next_fire_at, offset), version=s.version + 1)
        )
    wakeups = (
        await conn.execute(
            select(w.id, w.scheduled_at).where(*_mine(WAKEUPS, pair), w.status == "pending")
        )
    ).all()
    for wakeup_id, scheduled_at in wakeups:
        await conn.execute(
            update(WAKEUPS)
            .where(w.id == wakeup_id)
            .values(due_at=due_in_real_time(scheduled_at, offset))
        )


async def _shift_held(
    conn: AsyncConnection, pair: Pair, moved: timedelta, fresh: Collection[str] = ()
) -> None:
    """
    The pair's live messages keep their instants on its clock when the offset moves
    by ``moved``: their deadline and a held message's release, stored in real time
    (:func:`delivery.dispatcher.process.notification_row`), move back by it, and so
    does the held one's outbox entry. ``fresh``: messages written at the new offset.
    """
    if not moved:
        return
    n = NOTIFICATIONS.c
    rows = (
        await conn.execute(
            select(n.id, n.status, n.fire_at, n.expires_at).where(
                *_mine(NOTIFICATIONS, pair),
                n.status.in_(LIVE),
                (n.status == STAGED) | n.expires_at.is_not(None),
            )
        )
    ).all()
    for nid, status, fire_at, expires_at in rows:
        if nid in fresh:
            continue
        changes: dict[str, Any] = {}
        if expires_at is not None:
            changes["expires_at"] = expires_at - moved
        if status == STAGED:
            # Only while still held: the relay may have released it since the read
            # (no row lock here), setting the fire_at and release that must then stay.
            done = await conn.execute(
                update(NOTIFICATIONS)
                .where(n.id == nid, n.status == STAGED)
                .values(changes | {"fire_at": fire_at - moved})
            )
            if done.rowcount:
                await conn.execute(
                    update(OUTBOX)
                    .where(OUTBOX.c.msg_id == nid, OUTBOX.c.sent_at.is_(None))
                    .values(available_at=fire_at - moved)
                )
                continue
            if not changes:
                continue
        await conn.execute(update(NOTIFICATIONS).where(n.id == nid).values(changes))


async def _lock_schedules(conn: AsyncConnection, pair: Pair) -> None:
    """
    Lock the pair's schedules for the transaction (PostgreSQL; SQLite has one writer):
    a scheduler applying a plan made on the old clock then either committed before
    (and the rows are re-read after it) or waits and finds its version bumped.
    """
    await conn.execute(select(SCHEDULES.c.id).where(*_mine(SCHEDULES, pair)).with_for_update())


class SqlAdvanceStore:
    """
    :class:`AdvanceStore` over one engine.

    Args:
        engine: from :func:`delivery.store.engine.create_engine`; never closed here.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._runner = Runner(engine)

    async def clock_offset(self, pair: Pair) -> float | None:
        """
        See :meth:`AdvanceStore.clock_offset`.

        Every wakeup and schedule POST reads it, so it runs by the store's
        fastest path (one call to SQLite's driver thread): as a SQLAlchemy
        statement it was a sixth of a keyed wakeup POST's server CPU
        (``bench/bench_api_cost.py --profile``).
        """
        rows = await self._runner.read(
            selecting(
                SelectWhere(
                    OFFSETS,
                    owned_values(pair.project_id, agent_id=pair.agent_id, user_id=pair.user_id),
                    columns=("offset_s",),
                )
            )
        )
        return float(rows[0]["offset_s"]) if rows else None

    async def reset_clock(self, pair: Pair) -> float | None:
        """See :meth:`AdvanceStore.reset_clock`."""
        async with write_transaction(self.engine) as conn:
            row = (
                await conn.execute(
                    select(OFFSETS.c.offset_s).where(*_mine(OFFSETS, pair)).with_for_update()
                )
            ).first()
            if row is None:
                return None
            await conn.execute(delete(OFFSETS).where(*_mine(OFFSETS, pair)))
            await _lock_schedules(conn, pair)
            await _shift_rows(conn, pair, timedelta(0))
            await _shift_held(conn, pair, -timedelta(seconds=float(row[0])))
        return float(row[0])

    async def pair_state(self, pair: Pair, start: datetime, end: datetime) -> PairState:
        """See :meth:`AdvanceStore.pair_state`."""
        s, w = SCHEDULES.c, WAKEUPS.c
        mine_enabled = select(SCHEDULES).where(*_mine(SCHEDULES, pair), s.enabled).order_by(s.id)
        due_wakeups = (
            select(WAKEUPS)
            .where(
                *_mine(WAKEUPS, pair),
                w.status == "pending",
                w.scheduled_at >= start,
                w.scheduled_at < end,
            )
            .order_by(w.scheduled_at, w.id)
        )
        async with self.engine.connect() as conn:
            mine: list[Mapping[str, Any]] = [
                dict(r) for r in (await conn.execute(mine_enabled)).mappings()
            ]
            due: list[Mapping[str, Any]] = [
                dict(r) for r in (await conn.execute(due_wakeups)).mappings()
            ]
            named = {r["inventory_item_id"] for r in [*mine, *due] if r["inventory_item_id"]}
            items: dict[str, Mapping[str, Any]] = {}
            if named:
                result = await conn.execute(select(ITEMS).where(ITEMS.c.id.in_(sorted(named))))
                items = {r["id"]: dict(r) for r in result.mappings()}
        return PairState(mine, due, items)

    async def commit_advance(
        self,
        write: AdvanceWrite,
        *,
        job: JobClaim | None = None,
        job_result: Callable[[Written], Mapping[str, Any]] | None = None,
    ) -> Written:
        """See :meth:`AdvanceStore.commit_advance`."""
        s = SCHEDULES.c
        async with write_transaction(self.engine) as conn:
            await _move_offset(conn, write)
            await _lock_schedules(conn, write.pair)
            for move in write.schedule_moves:
                await conn.execute(
                    update(SCHEDULES)
                    .where(s.id == move["id"], s.version == move["version"])
                    .values(
                        next_fire_at=move["next_fire_at"],
                        last_fire_at=move["last_fire_at"],
                        staged_fire_at=move["staged_fire_at"],
                        enabled=move["enabled"],
                        version=s.version + 1,
                    )
                )
            await _shift_rows(conn, write.pair, timedelta(seconds=write.new_offset_s))
            await common.insert_ignoring_duplicates(
                conn, FIRES, write.fires, unique=["schedule_id", "fire_at"]
            )
            written = await run_core(writing(write.notifications), conn)
            # After the write, whose budget step locks the user's counter row before
            # it changes any message, as the dispatcher's does: one lock order. The
            # messages just written are on the new offset already.
            moved = write.new_offset_s - (write.old_offset_s or 0.0)
            fresh = {r["id"] for r in written.rows}
            await _shift_held(conn, write.pair, timedelta(seconds=moved), fresh)
            if job is not None:
                result = None if job_result is None else job_result(written)
                await _end_job(conn, job, write.now, result=result)
        return written

    async def create_job(
        self,
        job_id: str,
        pair: Pair,
        hours: float,
        now: datetime,
        *,
        owner: str,
        lease_until: datetime,
        forget_before: datetime,
    ) -> JobClaim:
        """See :meth:`AdvanceStore.create_job`."""
        async with write_transaction(self.engine) as conn:
            await conn.execute(JOBS.delete().where(JOBS.c.started_at < forget_before))
            await conn.execute(
                JOBS.insert().values(
                    id=job_id,
                    project_id=pair.project_id,
                    agent_id=pair.agent_id,
                    user_id=pair.user_id,
                    status="running",
                    started_at=now,
                    updated_at=now,
                    simulated_hours=hours,
                    lease_owner=owner,
                    lease_until=lease_until,
                )
            )
        return JobClaim(job_id, owner, pair, hours)

    async def renew_lease(self, job: JobClaim, until: datetime) -> bool:
        """See :meth:`AdvanceStore.renew_lease`."""
        async with write_transaction(self.engine) as conn:
            renewed = await conn.execute(update(JOBS).where(_held(job)).values(lease_until=until))
        return renewed.rowcount == 1

    async def fail_job(self, job: JobClaim, now: datetime, error: str) -> None:
        """See :meth:`AdvanceStore.fail_job`."""
        async with write_transaction(self.engine) as conn:
            await _end_job(conn, job, now, error=error)

    async def release_leases(self) -> int:
        """See :meth:`AdvanceStore.release_leases`."""
        async with write_transaction(self.engine) as conn:
            released = await conn.execute(
                update(JOBS).where(JOBS.c.status == "running").values(lease_until=None)
            )
        return int(released.rowcount)

    async def claim_lapsed_jobs(
        self,
        now: datetime,
        *,
        owner: str,
        lease_until: datetime,
        expired_before: datetime,
        limit: int,
    ) -> ClaimedJobs:
        """See :meth:`AdvanceStore.claim_lapsed_jobs`."""
        j = JOBS.c
        lapsed = (j.status == "running") & (j.lease_until.is_(None) | (j.lease_until < now))
        claimed = ClaimedJobs([], [])
        if not await any_row(self.engine, select(j.id).where(lapsed)):
            return claimed
        async with write_transaction(self.engine) as conn:
            rows = (
                await conn.execute(
                    select(JOBS)
                    .where(lapsed)
                    .order_by(j.started_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).mappings()
            for row in rows.all():
                if row["simulated_hours"] is None or row["started_at"] < expired_before:
                    await conn.execute(
                        update(JOBS)
                        .where(j.id == row["id"])
                        .values(
                            status="failed",
                            error=NOT_RESUMABLE,
                            updated_at=now,
                            lease_owner=None,
                            lease_until=None,
                        )
                    )
                    claimed.abandoned.append(row["id"])
                    continue
                await conn.execute(
                    update(JOBS)
                    .where(j.id == row["id"])
                    .values(lease_owner=owner, lease_until=lease_until)
                )
                pair = Pair(row["project_id"], row["agent_id"], row["user_id"])
                hours = float(row["simulated_hours"])
                claimed.claims.append(JobClaim(row["id"], owner, pair, hours))
        return claimed

    async def get_job(self, project_id: str, job_id: str) -> Mapping[str, Any] | None:
        """See :meth:`AdvanceStore.get_job`."""
        stmt = select(JOBS).where(*owned(JOBS, project_id, id=job_id))
        async with self.engine.connect() as conn:
            row = (await conn.execute(stmt)).mappings().first()
        return None if row is None else dict(row)


def advance_store(db: AdvanceStore | AsyncEngine) -> AdvanceStore:
    """``db`` itself, or the SQL store over it when the caller holds only an engine."""
    return SqlAdvanceStore(db) if isinstance(db, AsyncEngine) else db
