"""
Advance time (the Sonzai workbench "Advance Time" endpoint).

Each (project, agent, user) pair has a clock offset, zero until advanced. An
advance fires everything due in ``[pair now, pair now + simulated_hours)`` in
order, at the simulated instants: the pair's schedule ticks (active window and
DST rules from the cadence engine, skipped ticks recorded like the scheduler
records them) and its pending wakeups. The notifications are composed
synchronously and written in ONE transaction with the fire rows, the wakeup
transitions, the schedules' new ``next_fire_at``, the ``notification.created``
outbox rows and the new offset.

Deterministic: fire ids are the scheduler's
(:func:`delivery.planning.fire_id`), notification ids derive from them, and every
instant written is a simulated fire instant, so the same state and call give
the same rows, ids and response.

:mod:`~delivery.workbench.plan` is the pure planner, :mod:`~delivery.workbench.advance`
the shell that reads through the store (:mod:`delivery.store.advance`), plans,
composes and commits, and :mod:`~delivery.workbench.jobs` the ``async: true`` job queue.
"""

from delivery.store.advance import JobClaim, JobLost, Pair
from delivery.workbench.advance import advance_time, reset_clock
from delivery.workbench.jobs import (
    JOB_LEASE,
    JOB_SWEEP_S,
    JOB_TTL,
    claim_stalled_jobs,
    create_job,
    fail_job,
    get_job,
    new_job_id,
    new_owner,
    release_jobs,
    resume_stalled_jobs,
    run_job,
)
from delivery.workbench.plan import (
    MAX_SIMULATED_HOURS,
    AdvancePlan,
    Window,
    advance_window,
    plan_advance,
    response_body,
    validate_hours,
)

__all__ = [
    "JOB_LEASE",
    "JOB_SWEEP_S",
    "JOB_TTL",
    "MAX_SIMULATED_HOURS",
    "AdvancePlan",
    "JobClaim",
    "JobLost",
    "Pair",
    "Window",
    "advance_time",
    "advance_window",
    "claim_stalled_jobs",
    "create_job",
    "fail_job",
    "get_job",
    "new_job_id",
    "new_owner",
    "plan_advance",
    "release_jobs",
    "reset_clock",
    "response_body",
    "resume_stalled_jobs",
    "run_job",
    "validate_hours",
]
