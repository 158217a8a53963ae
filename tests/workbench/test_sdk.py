"""
Advance-time through the official sonzai SDK (sync and ``run_async`` + job polling),
against the API served by uvicorn, on SQLite and PostgreSQL.
"""

import asyncio
from datetime import UTC, datetime

import pytest
import sonzai
from sonzai._generated.models import WorkbenchAdvanceTimeJobBody, WorkbenchAdvanceTimeResponse

from delivery.clock import ManualClock
from delivery.planning import fire_id
from tests.api.server import serve_api

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
DAILY_9_UTC = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
A, U = "agent_abc", "user_123"


def test_sync_advance_fires_the_seed_example(database_url: str) -> None:
    """The documented example: a daily 09:00 UTC reminder, advance 48 hours -> two fires."""
    with (
        serve_api(database_url, ManualClock(START)) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        created = client.schedules.create(
            A,
            U,
            cadence=DAILY_9_UTC,
            intent="check in on how the user is feeling",
            check_type="reminder",
        )

        result = client.workbench.advance_time(A, U, 48)

        assert isinstance(result, sonzai.types.AdvanceTimeResponse)
        assert result.days_processed == 2
        fired = [w.wakeup_id for w in result.wakeups_executed]
        assert fired == [
            fire_id(created.schedule_id, datetime(2026, 5, d, 9, tzinfo=UTC)) for d in (1, 2)
        ]
        assert all(w.generated_message for w in result.wakeups_executed)
        # The same body passes the strict generated model (extra keys forbidden).
        WorkbenchAdvanceTimeResponse.model_validate(result.model_dump())
        pending = client.agents.notifications.list(A, user_id=U)
        assert len(pending.notifications) == 2
        # The pair's clock moved: the schedule's next fire is after the window.
        assert client.schedules.get(A, U, created.schedule_id).next_fire_at == (
            "2026-05-03T09:00:00Z"
        )


async def test_async_advance_job_polls_to_succeeded(database_url: str) -> None:
    """run_async answers 202 + job id; polling ends succeeded with the full result."""
    with serve_api(database_url, ManualClock(START)) as served:
        async with (
            sonzai.AsyncSonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
            sonzai.AsyncSonzai(api_key=served.keys["beta"], base_url=served.base_url) as other,
        ):
            await client.agents.schedule_wakeup(
                A,
                user_id=U,
                check_type="birthday",
                intent="wish the user a happy birthday",
                delay_hours=0,
                scheduled_at="2026-05-02T09:00:00Z",
                occasion="Sarah's 30th birthday",
            )

            job = await client.workbench.advance_time(A, U, 48, run_async=True)

            assert isinstance(job, dict)
            assert set(job) == {"job_id", "status"}
            assert job["status"] == "running"
            state = await client.workbench.get_advance_time_job(job["job_id"])
            for _ in range(200):
                if state["status"] != "running":
                    break
                await asyncio.sleep(0.05)
                state = await client.workbench.get_advance_time_job(job["job_id"])
            assert state["status"] == "succeeded", state
            body = WorkbenchAdvanceTimeJobBody.model_validate(state)
            assert body.result is not None
            [wakeup] = body.result.wakeups_executed or []
            assert (wakeup.check_type, wakeup.user_id) == ("birthday", U)
            generated = await client.workbench.workbench_get_advance_time_job(job["job_id"])
            assert generated.status == "succeeded"

            with pytest.raises(sonzai.NotFoundError):
                await other.workbench.get_advance_time_job(job["job_id"])
            with pytest.raises(sonzai.NotFoundError):
                await client.workbench.get_advance_time_job("job_unknown")
            with pytest.raises(sonzai.BadRequestError):
                await client.workbench.advance_time(A, U, 0)
