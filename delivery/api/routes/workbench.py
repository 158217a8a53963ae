"""
Workbench advance-time under ``/api/v1/workbench``.

Tenant-scoped: the API key's project owns the (agent, user) clock and the jobs.
``async: true`` answers 202 with a job id and runs the advance in the
background; the job is pollable for 30 minutes, then 404 like an unknown id.
"""

import asyncio
from typing import Any

import structlog
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from delivery.api.auth import ProjectId
from delivery.api.context import ApiContext, Ctx, ResourceId
from delivery.api.schemas import Ident
from delivery.bus.subjects import Subjects
from delivery.store.engine import after_commit
from delivery.workbench import (
    JobClaim,
    Pair,
    advance_time,
    create_job,
    get_job,
    new_job_id,
    new_owner,
    reset_clock,
    run_job,
    validate_hours,
)

router = APIRouter(tags=["workbench"])
PREFIX = "/api/v1/workbench"
log = structlog.get_logger(__name__)


class AdvanceTimeBody(BaseModel):
    """
    What ``client.workbench.advance_time`` always sends (verified against the SDK).

    ``simulated_base_offset_hours``, ``character_config`` and ``instance_id``
    are accepted and ignored: the pair's stored offset is the base of the
    window, and agents need no character config here.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    agent_id: Ident
    user_id: Ident
    simulated_hours: Any
    simulated_base_offset_hours: float = 0.0
    character_config: dict[str, Any] = Field(default_factory=dict)
    instance_id: str = ""
    run_async: bool = Field(default=False, alias="async")


async def _run(ctx: ApiContext, pair: Pair, hours: float) -> dict[str, Any]:
    return await advance_time(
        ctx.store.engine,
        ctx.composer.get(),
        Subjects(ctx.settings.subject_prefix),
        ctx.clock,
        pair,
        hours,
    )


async def _run_job(ctx: ApiContext, job: JobClaim) -> None:
    """The background half of ``async: true`` (a restart leaves it to the scheduler)."""
    await run_job(
        ctx.store.engine, ctx.composer.get(), Subjects(ctx.settings.subject_prefix), ctx.clock, job
    )


@router.post(f"{PREFIX}/advance-time", responses={200: {}, 202: {}})
async def advance(
    body: AdvanceTimeBody, project: ProjectId, ctx: Ctx, request: Request
) -> Response:
    """Fire everything due in the pair's next ``simulated_hours`` and move its clock."""
    hours = validate_hours(body.simulated_hours)
    pair = Pair(project, body.agent_id, body.user_id)
    if not body.run_async:
        return JSONResponse(await _run(ctx, pair, hours))
    job_id = new_job_id()
    # The row keeps the call and a lease: if this process dies before the advance
    # commits, the scheduler reruns the job once the lease lapses.
    claim = await create_job(
        ctx.store.engine, job_id, pair, hours, ctx.clock.now(), owner=new_owner("api")
    )
    # Keep a reference: the loop holds tasks weakly (asyncio.create_task docs).
    tasks: set[asyncio.Task[None]] = getattr(request.app.state, "workbench_jobs", set())
    request.app.state.workbench_jobs = tasks

    def start() -> None:
        task = asyncio.create_task(_run_job(ctx, claim))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        log.info("advance_time.job_started", job_id=job_id, agent_id=pair.agent_id)

    # Under an Idempotency-Key the job row commits after this answer: the runner
    # must not look for it before then.
    after_commit(ctx.store.engine, start)
    return JSONResponse({"job_id": job_id, "status": "running"}, status_code=202)


class ResetClockBody(BaseModel):
    """Whose clock goes back to real time."""

    model_config = ConfigDict(extra="forbid")

    agent_id: Ident
    user_id: Ident


@router.post(f"{PREFIX}/reset-clock", responses={200: {}})
async def reset(body: ResetClockBody, project: ProjectId, ctx: Ctx) -> Response:
    """
    Put the pair's clock back on real time (see :func:`delivery.workbench.reset_clock`);
    idempotent: a pair never advanced answers the same with a zero offset.
    """
    pair = Pair(project, body.agent_id, body.user_id)
    return JSONResponse(await reset_clock(ctx.store.engine, ctx.clock, pair))


@router.get(f"{PREFIX}/advance-time/jobs/{{job_id}}", responses={200: {}})
async def job(job_id: ResourceId, project: ProjectId, ctx: Ctx) -> Response:
    """The job's state; 404 for an unknown, foreign or expired job id."""
    return JSONResponse(await get_job(ctx.store.engine, project, job_id, ctx.clock.now()))
