"""
Advance time (seeds/001 "Advance Time", DESIGN decision 9, CONTRACT section 9).

Each (project, agent, user) pair has a clock offset, zero until advanced. An
advance fires everything due in ``[pair now, pair now + simulated_hours)`` in
order, at the simulated instants: the pair's schedule ticks (active window and
DST rules from the cadence engine, skipped ticks recorded like the scheduler
records them) and its pending wakeups. The notifications are composed
synchronously and written in ONE transaction with the fire rows, the wakeup
transitions, the schedules' new ``next_fire_at``, the ``notification.created``
outbox rows and the new offset.

Deterministic (DESIGN invariant 4): fire ids are the scheduler's
(:func:`delivery.planning.fire_id`), notification ids derive from them, and every
instant written is a simulated fire instant, so the same state and call give
the same rows, ids and response.
"""

import asyncio
import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.cadence import (
    LATEST,
    format_utc,
    next_fire,
    ticks_between,
)
from delivery.clock import Clock
from delivery.dispatcher.composers import Composer
from delivery.dispatcher.process import (
    ITEMS,
    SCHEDULES,
    WAKEUPS,
    compose_all,
    inventory_item,
    schedule_draft,
    wakeup_draft,
    write_notifications,
)
from delivery.domain import Draft
from delivery.errors import ConflictError, InvalidRequestError, NotFoundError
from delivery.planning import fire_id
from delivery.store import bulk
from delivery.store.engine import any_row, write_transaction
from delivery.store.schedules import compile_stored
from delivery.store.tables import AdvanceTimeJobRow, ClockOffsetRow, FireRow

log = structlog.get_logger(__name__)

FIRES: Table = FireRow.__table__  # type: ignore[attr-defined]
OFFSETS: Table = ClockOffsetRow.__table__  # type: ignore[attr-defined]
JOBS: Table = AdvanceTimeJobRow.__table__  # type: ignore[attr-defined]

MAX_SIMULATED_HOURS = 24 * 366
"""One (leap) year per call bounds the work of one request."""
JOB_TTL = timedelta(minutes=30)
"""seeds/001: job state is pollable for 30 minutes; after that the id is unknown (404)."""
JOB_LEASE = timedelta(seconds=60)
"""A job runner renews its lease every third of this; a lease this old means it died."""
JOB_SWEEP_S = 15.0
"""How often the scheduler looks for jobs whose runner died."""
_EPSILON = timedelta(microseconds=1)
_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Pair:
    """Whose clock moves: the key of ``clock_offsets``."""

    project_id: str
    agent_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class _Plan:
    start: datetime
    end: datetime
    old_offset_s: float | None
    fires: list[dict[str, Any]]
    drafts: list[Draft]
    schedule_moves: list[dict[str, Any]]


def validate_hours(value: Any) -> float:
    """
    ``simulated_hours`` as a float in (0, :data:`MAX_SIMULATED_HOURS`].

    Raises:
        InvalidRequestError: not a number, not finite, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError("simulated_hours", "simulated_hours must be a number of hours")
    if not 0 < value <= MAX_SIMULATED_HOURS:
        raise InvalidRequestError(
            "simulated_hours",
            f"simulated_hours must be greater than 0 and at most {MAX_SIMULATED_HOURS}, "
            f"got {value}",
        )
    return float(value)


async def _plan(conn: AsyncConnection, pair: Pair, now: datetime, hours: float) -> _Plan:
    """Read the pair's state and work out every fire of the window (no writes)."""
    offset_row = (
        await conn.execute(
            select(OFFSETS.c.offset_s).where(
                OFFSETS.c.project_id == pair.project_id,
                OFFSETS.c.agent_id == pair.agent_id,
                OFFSETS.c.user_id == pair.user_id,
            )
        )
    ).first()
    old_offset = None if offset_row is None else float(offset_row[0])
    offset = timedelta(seconds=old_offset or 0.0)
    # Compared as durations: a clock pushed near year 9999 by repeated advances would
    # overflow datetime arithmetic (a 500) before any instant could be checked.
    if offset + timedelta(hours=hours) >= LATEST - now:
        raise InvalidRequestError(
            "simulated_hours",
            f"simulated_hours {hours:g} would move this agent and user's simulated clock "
            f"to or past {format_utc(LATEST)}, the latest instant the service handles",
        )
    start = now + offset
    end = start + timedelta(hours=hours)
    owner = (
        SCHEDULES.c.project_id == pair.project_id,
        SCHEDULES.c.agent_id == pair.agent_id,
        SCHEDULES.c.user_id == pair.user_id,
    )
    schedules = [
        dict(r)
        for r in (
            await conn.execute(
                select(SCHEDULES).where(*owner, SCHEDULES.c.enabled).order_by(SCHEDULES.c.id)
            )
        ).mappings()
    ]
    wakeups = [
        dict(r)
        for r in (
            await conn.execute(
                select(WAKEUPS)
                .where(
                    WAKEUPS.c.project_id == pair.project_id,
                    WAKEUPS.c.agent_id == pair.agent_id,
                    WAKEUPS.c.user_id == pair.user_id,
                    WAKEUPS.c.status == "pending",
                    WAKEUPS.c.scheduled_at >= start,
                    WAKEUPS.c.scheduled_at < end,
                )
                .order_by(WAKEUPS.c.scheduled_at, WAKEUPS.c.id)
            )
        ).mappings()
    ]
    item_ids = sorted(
        {r["inventory_item_id"] for r in [*schedules, *wakeups] if r["inventory_item_id"]}
    )
    items: dict[str, Mapping[str, Any]] = {}
    if item_ids:
        result = await conn.execute(select(ITEMS).where(ITEMS.c.id.in_(item_ids)))
        items = {r["id"]: dict(r) for r in result.mappings()}

    fires: list[dict[str, Any]] = []
    drafts: list[Draft] = []
    moves: list[dict[str, Any]] = []
    for schedule in schedules:
        compiled = compile_stored(schedule)
        # ticks_between is (after, until]; shifting both ends by 1 us gives [start, end).
        ticks = ticks_between(compiled, start - _EPSILON, end - _EPSILON)
        item = inventory_item(items.get(schedule["inventory_item_id"] or ""), schedule)
        fired_at: datetime | None = None
        for tick in ticks:
            fid = fire_id(schedule["id"], tick.fire_at)
            fires.append(
                {
                    "id": fid,
                    "schedule_id": schedule["id"],
                    "project_id": pair.project_id,
                    "agent_id": pair.agent_id,
                    "user_id": pair.user_id,
                    "fire_at": tick.fire_at,
                    "status": "fired" if tick.skipped is None else "skipped",
                    "skip_reason": None if tick.skipped is None else tick.skipped.value,
                    "created_at": tick.fire_at,
                }
            )
            if tick.skipped is None:
                drafts.append(schedule_draft(schedule, fid, tick.fire_at, item))
                fired_at = tick.fire_at
        # The pair's clock passes these ticks: the scheduler must not fire them again
        # when real time gets there, so next_fire_at moves past the window.
        current = schedule["next_fire_at"]
        if current is not None and current < end:
            upcoming = next_fire(compiled, end - _EPSILON)
            ended = compiled.ends_at is not None and compiled.ends_at <= end
            moves.append(
                {
                    "id": schedule["id"],
                    "version": schedule["version"],
                    "next_fire_at": upcoming,
                    "last_fire_at": fired_at or schedule["last_fire_at"],
                    "enabled": not (ended and upcoming is None),
                    # A fire the scheduler staged in the window fired here (same
                    # fire id; its own message later finds the notification made).
                    "staged_fire_at": None,
                }
            )
    for wakeup in wakeups:
        item = inventory_item(items.get(wakeup["inventory_item_id"] or ""), wakeup)
        drafts.append(wakeup_draft(wakeup, item))
    # In order of the simulated instants; ties broken by kind then id, for determinism.
    drafts.sort(key=lambda d: (d.fire_at, d.block.kind.value, d.source_id))
    fires.sort(key=lambda f: (f["fire_at"], f["id"]))
    return _Plan(start, end, old_offset, fires, drafts, moves)


async def _move_offset(
    conn: AsyncConnection, pair: Pair, old: float | None, new: float, now: datetime
) -> None:
    """
    Compare-and-set the pair's offset.

    Raises:
        ConflictError: another advance of the same pair committed first.
    """
    key = {"project_id": pair.project_id, "agent_id": pair.agent_id, "user_id": pair.user_id}
    if old is None:
        insert: Any = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        stmt = (
            insert(OFFSETS)
            .values(**key, offset_s=new, updated_at=now)
            .on_conflict_do_nothing(index_elements=list(key))
            .returning(OFFSETS.c.project_id)
        )
        if (await conn.execute(stmt)).first() is None:
            raise ConflictError("", "a concurrent advance-time moved this clock first")
        return
    result = await conn.execute(
        update(OFFSETS)
        .where(
            OFFSETS.c.project_id == pair.project_id,
            OFFSETS.c.agent_id == pair.agent_id,
            OFFSETS.c.user_id == pair.user_id,
            OFFSETS.c.offset_s == old,
        )
        .values(offset_s=new, updated_at=now)
    )
    if result.rowcount != 1:
        raise ConflictError("", "a concurrent advance-time moved this clock first")


def response_body(hours: float, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """
    The CONTRACT section 9 response: exactly the G model's keys, nothing else.

    ``wakeups_executed`` lists every fire in order; a schedule fire's
    ``wakeup_id`` is its fire id (DESIGN decision 9).
    """
    return {
        "days_processed": int(hours // 24),
        "consolidation_ran": False,
        "weekly_consolidations": 0,
        "diary_entries_created": 0,
        "consolidation_processed": 0,
        "diary_entries": [],
        "wakeups_executed": [
            {
                "wakeup_id": row["source_id"],
                "agent_id": row["agent_id"],
                "user_id": row["user_id"],
                "check_type": row["check_type"],
                "intent": row["intent"],
                "generated_message": row["generated_message"],
            }
            for row in rows
        ],
    }


async def advance_time(
    engine: AsyncEngine,
    composer: Composer,
    subjects: Subjects,
    clock: Clock,
    pair: Pair,
    simulated_hours: float,
    *,
    job: "JobClaim | None" = None,
) -> dict[str, Any]:
    """
    Advance ``pair``'s clock by ``simulated_hours`` and fire what falls due.

    Args:
        simulated_hours: validated with :func:`validate_hours`.
        job: the ``async: true`` job this advance runs for; it is marked
            ``succeeded`` in the advance's own transaction, so a job still
            ``running`` after a crash is one whose advance never committed.

    Returns:
        The CONTRACT section 9 response body.

    Raises:
        ConflictError: the pair's clock kept moving under concurrent advances.
        JobLost: ``job``'s lease passed to another runner; nothing was written.
    """
    hours = validate_hours(simulated_hours)
    bound = log.bind(
        project_id=pair.project_id, agent_id=pair.agent_id, user_id=pair.user_id, hours=hours
    )
    for attempt in range(1, _ATTEMPTS + 1):
        now = clock.now()
        async with engine.connect() as conn:
            plan = await _plan(conn, pair, now, hours)
        # Composed outside the transaction: an LLM call never holds the write lock.
        composed = await compose_all(composer, plan.drafts)
        new_offset = (plan.end - now).total_seconds()
        try:
            async with write_transaction(engine) as conn:
                await _move_offset(conn, pair, plan.old_offset_s, new_offset, now)
                for move in plan.schedule_moves:
                    # The version check drops our move if the API or a scheduler
                    # replica changed the row meanwhile; the fire ids still dedupe.
                    await conn.execute(
                        update(SCHEDULES)
                        .where(SCHEDULES.c.id == move["id"], SCHEDULES.c.version == move["version"])
                        .values(
                            next_fire_at=move["next_fire_at"],
                            last_fire_at=move["last_fire_at"],
                            staged_fire_at=move["staged_fire_at"],
                            enabled=move["enabled"],
                            version=SCHEDULES.c.version + 1,
                        )
                    )
                await bulk.insert_ignoring_duplicates(
                    conn, FIRES, plan.fires, unique=["schedule_id", "fire_at"]
                )
                rows, skipped = await write_notifications(
                    conn,
                    composed,
                    subjects=subjects,
                    now=now,
                    simulated=True,
                    # A fire the scheduler staged in the window may already have a
                    # staged notification: this simulated one replaces it.
                    replace=[d.source_id for d in plan.drafts if d.schedule_id is not None],
                )
                body = response_body(hours, rows)
                if job is not None:
                    await _complete_job(conn, job, now, result=body)
        except ConflictError:
            bound.warning("advance_time.retry", attempt=attempt)
            if attempt == _ATTEMPTS:
                raise
            continue
        for row in rows:
            bound.info(
                "notification.created",
                notification_id=row["id"],
                source_id=row["source_id"],
                fire_at=format_utc(row["fire_at"]),
                status=row["status"],
            )
        bound.info(
            "advance_time.done",
            window_start=format_utc(plan.start),
            window_end=format_utc(plan.end),
            fires=len(rows),
            lost=sorted(skipped),
        )
        return body
    raise AssertionError("unreachable")  # pragma: no cover


class JobLost(Exception):
    """The job's lease passed to another runner (ours lapsed): this run must not commit."""


@dataclass(frozen=True, slots=True)
class JobClaim:
    """A runner's hold on a ``running`` job: the job, the call, and who holds the lease."""

    id: str
    owner: str
    pair: Pair
    hours: float


def new_job_id() -> str:
    """A random job id (``job_...``)."""
    return f"job_{secrets.token_hex(12)}"


def new_owner(role: str) -> str:
    """A lease owner id for one runner (``role`` says which process, for operators)."""
    return f"{role}_{secrets.token_hex(6)}"


async def create_job(
    engine: AsyncEngine, job_id: str, pair: Pair, hours: float, now: datetime, *, owner: str
) -> JobClaim:
    """Record a ``running`` job that ``owner`` holds for :data:`JOB_LEASE`."""
    async with write_transaction(engine) as conn:
        # Jobs are unknown (404) after JOB_TTL anyway; drop them as new ones start.
        await conn.execute(JOBS.delete().where(JOBS.c.started_at < now - JOB_TTL))
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
                lease_until=now + JOB_LEASE,
            )
        )
    return JobClaim(job_id, owner, pair, hours)


def _held(job: JobClaim) -> ColumnElement[bool]:
    return (JOBS.c.id == job.id) & (JOBS.c.status == "running") & (JOBS.c.lease_owner == job.owner)


async def _complete_job(
    conn: AsyncConnection,
    job: JobClaim,
    now: datetime,
    *,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """
    Mark ``job`` ``succeeded`` with its result, or ``failed`` with its error.

    Raises:
        JobLost: ``job`` is no longer ours (its lease lapsed and another runner
            took it): the caller's transaction must roll back.
    """
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


async def fail_job(engine: AsyncEngine, job: JobClaim, now: datetime, error: str) -> None:
    """Mark ``job`` ``failed`` unless it is no longer ours (then its new runner decides)."""
    try:
        async with write_transaction(engine) as conn:
            await _complete_job(conn, job, now, error=error)
    except JobLost:
        log.info("advance_time.job_taken_over", job_id=job.id, owner=job.owner)


async def _keep_lease(engine: AsyncEngine, job: JobClaim, clock: Clock) -> None:
    """Renew ``job``'s lease until cancelled, so a slow advance is not taken over."""
    while True:
        await asyncio.sleep(JOB_LEASE.total_seconds() / 3)
        try:
            async with write_transaction(engine) as conn:
                renewed = await conn.execute(
                    update(JOBS).where(_held(job)).values(lease_until=clock.now() + JOB_LEASE)
                )
        except Exception:
            # A database blip: try again next round. If the lease lapses meanwhile,
            # another runner takes the job and this run's commit raises JobLost.
            log.warning("advance_time.lease_renewal_failed", job_id=job.id, exc_info=True)
            continue
        if renewed.rowcount != 1:
            return


async def run_job(
    engine: AsyncEngine, composer: Composer, subjects: Subjects, clock: Clock, job: JobClaim
) -> None:
    """Run ``job``'s advance; every outcome ends in the job row (a process edge)."""
    bound = log.bind(job_id=job.id, agent_id=job.pair.agent_id, user_id=job.pair.user_id)
    keeper = asyncio.create_task(_keep_lease(engine, job, clock))
    try:
        await advance_time(engine, composer, subjects, clock, job.pair, job.hours, job=job)
    except JobLost:
        bound.warning("advance_time.job_taken_over", owner=job.owner)
        return
    except Exception as exc:
        bound.exception("advance_time.job_failed")
        await fail_job(engine, job, clock.now(), str(exc) or repr(exc))
        return
    finally:
        keeper.cancel()
    bound.info("advance_time.job_succeeded")


async def release_jobs(engine: AsyncEngine) -> int:
    """
    End every lease (single-process SQLite start-up: a lease left is a dead process's).

    Returns:
        How many running jobs become resumable at once.
    """
    async with write_transaction(engine) as conn:
        released = await conn.execute(
            update(JOBS).where(JOBS.c.status == "running").values(lease_until=None)
        )
    return int(released.rowcount)


async def claim_stalled_jobs(
    engine: AsyncEngine, now: datetime, *, owner: str, limit: int = 10
) -> list[JobClaim]:
    """
    Take over ``running`` jobs whose lease lapsed (their runner died); fail the unrunnable.

    A job is only ``running`` while its advance has not committed (the advance marks
    it ``succeeded`` in its own transaction), so rerunning it fires the window once.
    Jobs past :data:`JOB_TTL` or from before the job row kept its hours are failed.
    """
    lapsed = (JOBS.c.status == "running") & (
        JOBS.c.lease_until.is_(None) | (JOBS.c.lease_until < now)
    )
    if not await any_row(engine, select(JOBS.c.id).where(lapsed)):
        return []
    claims: list[JobClaim] = []
    async with write_transaction(engine) as conn:
        rows = (
            (
                await conn.execute(
                    select(JOBS)
                    .where(lapsed)
                    .order_by(JOBS.c.started_at)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            )
            .mappings()
            .all()
        )
        for row in rows:
            if row["simulated_hours"] is None or row["started_at"] + JOB_TTL < now:
                await conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id == row["id"])
                    .values(
                        status="failed",
                        error="interrupted by a restart and not resumable; advance again",
                        updated_at=now,
                        lease_owner=None,
                        lease_until=None,
                    )
                )
                log.warning("advance_time.job_abandoned", job_id=row["id"])
                continue
            await conn.execute(
                update(JOBS)
                .where(JOBS.c.id == row["id"])
                .values(lease_owner=owner, lease_until=now + JOB_LEASE)
            )
            pair = Pair(row["project_id"], row["agent_id"], row["user_id"])
            claims.append(JobClaim(row["id"], owner, pair, float(row["simulated_hours"])))
    return claims


async def resume_stalled_jobs(
    engine: AsyncEngine,
    make_composer: Callable[[], Composer],
    subjects: Subjects,
    clock: Clock,
    *,
    owner: str,
) -> int:
    """Claim and rerun the jobs whose runner died; how many were rerun."""
    claims = await claim_stalled_jobs(engine, clock.now(), owner=owner)
    if not claims:
        return 0
    composer = make_composer()
    try:
        for job in claims:
            log.info("advance_time.job_resumed", job_id=job.id, owner=owner)
            await run_job(engine, composer, subjects, clock, job)
    finally:
        await composer.aclose()
    return len(claims)


async def get_job(
    engine: AsyncEngine, project_id: str, job_id: str, now: datetime
) -> dict[str, Any]:
    """
    The job's wire body (G ``WorkbenchAdvanceTimeJobBody``: no other keys, no nulls).

    Raises:
        NotFoundError: unknown id, another project's job, or older than :data:`JOB_TTL`.
    """
    async with engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    select(JOBS).where(JOBS.c.id == job_id, JOBS.c.project_id == project_id)
                )
            )
            .mappings()
            .first()
        )
    if row is None or row["started_at"] + JOB_TTL < now:
        raise NotFoundError("job_id", f"advance-time job {job_id!r} not found", resource="job")
    body: dict[str, Any] = {
        "job_id": row["id"],
        "status": row["status"],
        "agent_id": row["agent_id"],
        "user_id": row["user_id"],
        "started_at": format_utc(row["started_at"]),
        "updated_at": format_utc(row["updated_at"]),
    }
    if row["result_json"] is not None:
        body["result"] = json.loads(row["result_json"])
    if row["error"] is not None:
        body["error"] = row["error"]
    return body
