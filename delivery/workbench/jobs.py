"""
The ``async: true`` job queue of advance-time.

A job row keeps the call (pair, hours) and a lease: its runner renews the lease
while the advance runs, and the advance marks the job ``succeeded`` in its own
transaction. A job still ``running`` with a lapsed lease is one whose runner
died before committing; the scheduler's sweep reruns it, which fires the
window once.
"""

import asyncio
import json
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog

from delivery.bus.subjects import Subjects
from delivery.cadence import format_utc
from delivery.clock import Clock
from delivery.dispatcher.composers import Composer
from delivery.errors import NotFoundError
from delivery.store.advance import AdvanceStore, JobClaim, JobLost, Pair, advance_store
from delivery.store.engine import Engine
from delivery.workbench.advance import advance_time

log = structlog.get_logger(__name__)

JOB_TTL = timedelta(minutes=30)
"""As the Sonzai docs describe: job state is pollable for 30 minutes, then unknown (404)."""
JOB_LEASE = timedelta(seconds=60)
"""A job runner renews its lease every third of this; a lease this old means it died."""
JOB_SWEEP_S = 15.0
"""How often the scheduler looks for jobs whose runner died."""


def new_job_id() -> str:
    """A random job id (``job_...``)."""
    return f"job_{secrets.token_hex(12)}"


def new_owner(role: str) -> str:
    """A lease owner id for one runner (``role`` says which process, for operators)."""
    return f"{role}_{secrets.token_hex(6)}"


async def create_job(
    db: AdvanceStore | Engine,
    job_id: str,
    pair: Pair,
    hours: float,
    now: datetime,
    *,
    owner: str,
) -> JobClaim:
    """Record a ``running`` job that ``owner`` holds for :data:`JOB_LEASE`."""
    # Jobs are unknown (404) after JOB_TTL anyway; drop them as new ones start.
    return await advance_store(db).create_job(
        job_id,
        pair,
        hours,
        now,
        owner=owner,
        lease_until=now + JOB_LEASE,
        forget_before=now - JOB_TTL,
    )


async def fail_job(db: AdvanceStore | Engine, job: JobClaim, now: datetime, error: str) -> None:
    """Mark ``job`` ``failed`` unless it is no longer ours (then its new runner decides)."""
    try:
        await advance_store(db).fail_job(job, now, error)
    except JobLost:
        log.info("advance_time.job_taken_over", job_id=job.id, owner=job.owner)


async def _keep_lease(store: AdvanceStore, job: JobClaim, clock: Clock) -> None:
    """Renew ``job``'s lease until cancelled, so a slow advance is not taken over."""
    while True:
        await asyncio.sleep(JOB_LEASE.total_seconds() / 3)
        try:
            renewed = await store.renew_lease(job, clock.now() + JOB_LEASE)
        except Exception:
            # A database blip: try again next round. If the lease lapses meanwhile,
            # another runner takes the job and this run's commit raises JobLost.
            log.warning("advance_time.lease_renewal_failed", job_id=job.id, exc_info=True)
            continue
        if not renewed:
            return


async def run_job(
    db: AdvanceStore | Engine, composer: Composer, subjects: Subjects, clock: Clock, job: JobClaim
) -> None:
    """Run ``job``'s advance; every outcome ends in the job row (a process edge)."""
    store = advance_store(db)
    bound = log.bind(job_id=job.id, agent_id=job.pair.agent_id, user_id=job.pair.user_id)
    keeper = asyncio.create_task(_keep_lease(store, job, clock))
    try:
        await advance_time(store, composer, subjects, clock, job.pair, job.hours, job=job)
    except JobLost:
        bound.warning("advance_time.job_taken_over", owner=job.owner)
        return
    except Exception as exc:
        bound.exception("advance_time.job_failed")
        await fail_job(store, job, clock.now(), str(exc) or repr(exc))
        return
    finally:
        keeper.cancel()
    bound.info("advance_time.job_succeeded")


async def release_jobs(db: AdvanceStore | Engine) -> int:
    """
    End every lease (single-process SQLite start-up: a lease left is a dead process's).

    Returns:
        How many running jobs become resumable at once.
    """
    return await advance_store(db).release_leases()


async def claim_stalled_jobs(
    db: AdvanceStore | Engine, now: datetime, *, owner: str, limit: int = 10
) -> list[JobClaim]:
    """
    Take over ``running`` jobs whose lease lapsed (their runner died); fail the unrunnable.

    A job is only ``running`` while its advance has not committed (the advance marks
    it ``succeeded`` in its own transaction), so rerunning it fires the window once.
    Jobs past :data:`JOB_TTL` or from before the job row kept its hours are failed.
    """
    claimed = await advance_store(db).claim_lapsed_jobs(
        now, owner=owner, lease_until=now + JOB_LEASE, expired_before=now - JOB_TTL, limit=limit
    )
    for job_id in claimed.abandoned:
        log.warning("advance_time.job_abandoned", job_id=job_id)
    return claimed.claims


async def resume_stalled_jobs(
    db: AdvanceStore | Engine,
    make_composer: Callable[[], Composer],
    subjects: Subjects,
    clock: Clock,
    *,
    owner: str,
) -> int:
    """Claim and rerun the jobs whose runner died; how many were rerun."""
    store = advance_store(db)
    claims = await claim_stalled_jobs(store, clock.now(), owner=owner)
    if not claims:
        return 0
    composer = make_composer()
    try:
        for job in claims:
            log.info("advance_time.job_resumed", job_id=job.id, owner=owner)
            await run_job(store, composer, subjects, clock, job)
    finally:
        await composer.aclose()
    return len(claims)


async def get_job(
    db: AdvanceStore | Engine, project_id: str, job_id: str, now: datetime
) -> dict[str, Any]:
    """
    The job's wire body (G ``WorkbenchAdvanceTimeJobBody``: no other keys, no nulls).

    Raises:
        NotFoundError: unknown id, another project's job, or older than :data:`JOB_TTL`.
    """
    row = await advance_store(db).get_job(project_id, job_id)
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
