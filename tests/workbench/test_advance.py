"""Advance-time core on SQLite and PostgreSQL: the documented example, order, determinism."""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.domain import notification_id
from delivery.errors import InvalidRequestError
from delivery.planning import fire_id
from delivery.store.tables import (
    AdvanceTimeJobRow,
    ClockOffsetRow,
    FireRow,
    NotificationRow,
    OutboxRow,
    ScheduleRow,
    WakeupRow,
)
from delivery.workbench import (
    JOB_LEASE,
    JobLost,
    Pair,
    advance_time,
    claim_stalled_jobs,
    create_job,
    get_job,
    resume_stalled_jobs,
    run_job,
    validate_hours,
)
from tests.dispatcher import rows

NOW = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
PAIR = Pair("proj_1", "agent_1", "user_1")
DAILY_9_UTC = json.dumps(
    {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}, sort_keys=True
)


def at(day: int, hour: int) -> datetime:
    return datetime(2026, 5, day, hour, tzinfo=UTC)


async def seed(engine: AsyncEngine) -> None:
    await rows.project(engine)
    await rows.schedule(
        engine, cadence_json=DAILY_9_UTC, timezone="UTC", next_fire_at=at(1, 9), anchor_at=NOW
    )


async def advance(
    engine: AsyncEngine, hours: float, clock: ManualClock | None = None
) -> dict[str, Any]:
    return await advance_time(
        engine, TemplateComposer(), Subjects("wb"), clock or ManualClock(NOW), PAIR, hours
    )


async def test_seed_example_two_daily_fires_in_48_hours(engine: AsyncEngine) -> None:
    """The documented example: a daily 09:00 UTC schedule, advance 48 hours -> exactly two fires."""
    await seed(engine)

    body = await advance(engine, 48)

    fires = [fire_id("sch_1", at(1, 9)), fire_id("sch_1", at(2, 9))]
    # The dispatcher's message step: the built-in default for a reminder, as for a
    # fire the scheduler makes (no project template here).
    message = "Hi! Just a friendly reminder from me. Anything I can help with?"
    assert body == {
        "days_processed": 2,
        "consolidation_ran": False,
        "weekly_consolidations": 0,
        "diary_entries_created": 0,
        "consolidation_processed": 0,
        "diary_entries": [],
        "wakeups_executed": [
            {
                "wakeup_id": fid,
                "agent_id": "agent_1",
                "user_id": "user_1",
                "check_type": "reminder",
                "intent": "check in on how the user is feeling",
                "generated_message": message,
            }
            for fid in fires
        ],
    }
    notes = await rows.notifications(engine)
    assert [n["id"] for n in notes] == [notification_id(f) for f in fires]
    assert [n["created_at"] for n in notes] == [at(1, 9), at(2, 9)]
    assert [json.loads(n["payload_json"])["fire_at_local"] for n in notes] == [
        "2026-05-01T09:00:00+00:00",
        "2026-05-02T09:00:00+00:00",
    ]
    assert len(await rows.outbox(engine)) == 2
    schedule = await rows.row(engine, ScheduleRow, "sch_1")
    assert (schedule["next_fire_at"], schedule["last_fire_at"]) == (at(3, 9), at(2, 9))
    offset = await rows.row_where(engine, ClockOffsetRow, agent_id="agent_1")
    assert offset["offset_s"] == 48 * 3600


async def test_second_advance_continues_from_the_pairs_clock(engine: AsyncEngine) -> None:
    """The offset persists: a second advance starts where the first ended, no refire."""
    await seed(engine)
    await advance(engine, 30)  # 05-01 00:00 -> 05-02 06:00: one fire

    body = await advance(engine, 5)  # 05-02 06:00 -> 11:00: the 05-02 09:00 fire

    assert [w["wakeup_id"] for w in body["wakeups_executed"]] == [fire_id("sch_1", at(2, 9))]
    assert body["days_processed"] == 0
    assert len(await rows.notifications(engine)) == 2


async def test_wakeups_and_fires_in_order(engine: AsyncEngine) -> None:
    """Pending wakeups inside the window fire in time order with the schedule ticks."""
    await seed(engine)
    await rows.wakeup(engine, "wk_in", scheduled_at=at(1, 12))
    await rows.wakeup(engine, "wk_late", scheduled_at=at(3, 0))  # window end is exclusive
    await rows.wakeup(engine, "wk_cancelled", scheduled_at=at(1, 10), status="cancelled")
    await rows.wakeup(engine, "wk_other", scheduled_at=at(1, 10), user_id="user_2")

    body = await advance(engine, 48)

    assert [w["wakeup_id"] for w in body["wakeups_executed"]] == [
        fire_id("sch_1", at(1, 9)),
        "wk_in",
        fire_id("sch_1", at(2, 9)),
    ]
    wk_in = await rows.row(engine, WakeupRow, "wk_in")
    assert (wk_in["status"], wk_in["executed_at"]) == ("executed", at(1, 12))
    for wid in ("wk_late", "wk_other"):
        assert (await rows.row(engine, WakeupRow, wid))["status"] == "pending"
    assert (await rows.row(engine, WakeupRow, "wk_cancelled"))["status"] == "cancelled"


async def test_same_state_same_call_same_result(engine: AsyncEngine) -> None:
    """Determinism: ids, messages and instants depend only on state and call, not on runs."""
    await seed(engine)
    first = await advance(engine, 48)
    first_notes = await rows.notifications(engine)
    # Reset the state the advance changed, then run the identical call again.
    async with engine.begin() as conn:
        for model in (NotificationRow, OutboxRow, FireRow, ClockOffsetRow):
            await conn.execute(rows.table(model).delete())
        await conn.execute(
            rows.table(ScheduleRow).update().values(next_fire_at=at(1, 9), last_fire_at=None)
        )

    second = await advance(engine, 48)

    assert second == first
    assert [n["payload_json"] for n in await rows.notifications(engine)] == [
        n["payload_json"] for n in first_notes
    ]


async def test_real_clock_later_does_not_refire(engine: AsyncEngine) -> None:
    """After the pair advanced, real time reaching those ticks finds them already fired."""
    await seed(engine)
    await advance(engine, 48)

    body = await advance(engine, 1, ManualClock(NOW + timedelta(hours=10)))

    # The pair's clock is now 05-03 10:00 + 1 h: nothing due; the 05-01 ticks stay single.
    assert body["wakeups_executed"] == []
    assert len(await rows.notifications(engine)) == 2


@pytest.mark.parametrize("value", [0, -1, float("inf"), "48", True, 24 * 367])
def test_invalid_hours_are_rejected(value: object) -> None:
    """simulated_hours must be a positive finite number of at most a year."""
    with pytest.raises(InvalidRequestError):
        validate_hours(value)


async def test_concurrent_advances_of_one_pair_serialise(engine: AsyncEngine) -> None:
    """Two advances racing on one pair both apply, one after the other: no tick twice."""
    await seed(engine)

    first, second = await asyncio.gather(advance(engine, 24), advance(engine, 24))

    fired = [w["wakeup_id"] for w in first["wakeups_executed"] + second["wakeups_executed"]]
    assert sorted(fired) == sorted(fire_id("sch_1", at(d, 9)) for d in (1, 2))
    assert len(await rows.notifications(engine)) == 2
    offset = await rows.row_where(engine, ClockOffsetRow, agent_id="agent_1")
    assert offset["offset_s"] == 48 * 3600


# --- async jobs across a restart ---------------------------------------------------

LEASE_PASSED = NOW + JOB_LEASE + timedelta(seconds=1)


async def resume(engine: AsyncEngine, at_: datetime, owner: str = "scheduler_b") -> int:
    return await resume_stalled_jobs(
        engine, TemplateComposer, Subjects("wb"), ManualClock(at_), owner=owner
    )


async def test_a_job_whose_runner_died_is_rerun_once_after_its_lease(engine: AsyncEngine) -> None:
    """A job left ``running`` by a dead API process completes once, with the call's window."""
    await seed(engine)
    # The API accepted the job and died before the advance committed.
    job = await create_job(engine, "job_dead", PAIR, 48, NOW, owner="api_dead")

    assert await resume(engine, NOW + JOB_LEASE / 2) == 0  # the lease still holds
    assert (await get_job(engine, PAIR.project_id, job.id, NOW))["status"] == "running"

    assert await resume(engine, LEASE_PASSED) == 1
    done = await get_job(engine, PAIR.project_id, job.id, LEASE_PASSED)
    assert done["status"] == "succeeded"
    assert [w["wakeup_id"] for w in done["result"]["wakeups_executed"]] == [
        fire_id("sch_1", at(d, 9)) for d in (1, 2)
    ]
    assert await resume(engine, LEASE_PASSED + JOB_LEASE * 2) == 0
    assert len(await rows.notifications(engine)) == 2
    offset = await rows.row_where(engine, ClockOffsetRow, agent_id="agent_1")
    assert offset["offset_s"] == 48 * 3600


async def test_a_runner_that_lost_its_lease_commits_nothing(engine: AsyncEngine) -> None:
    """Two runners of one job (a slow one and its successor): exactly one advance lands."""
    await seed(engine)
    slow = await create_job(engine, "job_slow", PAIR, 48, NOW, owner="api_slow")
    [successor] = await claim_stalled_jobs(engine, LEASE_PASSED, owner="scheduler_b")
    assert (successor.id, successor.hours, successor.pair) == (slow.id, 48, PAIR)

    with pytest.raises(JobLost):
        await advance_time(
            engine, TemplateComposer(), Subjects("wb"), ManualClock(NOW), PAIR, 48, job=slow
        )
    assert await rows.count(engine, NotificationRow) == 0
    assert await rows.count(engine, ClockOffsetRow) == 0

    await run_job(engine, TemplateComposer(), Subjects("wb"), ManualClock(NOW), successor)
    assert (await get_job(engine, PAIR.project_id, slow.id, NOW))["status"] == "succeeded"
    assert await rows.count(engine, NotificationRow) == 2


async def test_unresumable_jobs_are_failed_with_a_reason(engine: AsyncEngine) -> None:
    """A job without its hours (an older row) or past the 30 minutes fails instead of rerunning."""
    await seed(engine)
    await create_job(engine, "job_old", PAIR, 48, NOW, owner="api_dead")
    async with engine.begin() as conn:
        await conn.execute(
            rows.table(AdvanceTimeJobRow).update().values(simulated_hours=None, lease_until=None)
        )
    assert await resume(engine, NOW) == 0
    failed = await get_job(engine, PAIR.project_id, "job_old", NOW)
    assert failed["status"] == "failed"
    assert "restart" in failed["error"]
    assert await rows.count(engine, NotificationRow) == 0
