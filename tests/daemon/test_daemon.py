"""
The composed daemon in-process (API + scheduler + relay + dispatcher on SQLite and a real
NATS): a write through the API wakes the scheduler, and shutdown is clean.
"""

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from pydantic import SecretStr

from delivery.bus.subjects import Subjects
from delivery.daemon import Daemon
from delivery.loops import PeriodicLoop
from delivery.settings import Settings
from delivery.store.tables import NotificationRow
from tests.daemon.helpers import delete_stream

KEY = "dk_test_daemon_key_0123456789abcdef"


@pytest.fixture
def settings(tmp_path: Path, nats_url: str, subject_prefix: str) -> Settings:
    """Embedded settings on a fresh data dir; ticks so slow that only a wake() can fire fast."""
    return Settings(
        data_dir=tmp_path / "data",
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        port=0,
        tick_interval_s=30,
        bootstrap_api_key=SecretStr(KEY),
    )


async def test_an_api_write_wakes_the_scheduler_and_shutdown_is_clean(settings):
    """A wakeup due now becomes a pending notification long before the next periodic tick."""
    daemon = Daemon(settings)  # every part, as `delivery run`
    running = asyncio.create_task(daemon.run(install_signals=False))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 30)
        assert daemon.api_url is not None
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=daemon.api_url, headers=headers) as client:
            # The daemon's first ticks have run; the next periodic one is 30 s away.
            await asyncio.sleep(0)
            created = await client.post(
                "/api/v1/agents/agent_1/wakeups",
                json={"user_id": "u1", "check_type": "reminder", "intent": "hi", "delay_hours": 0},
            )
            assert created.status_code == 201, created.text
            wakeup_id = created.json()["wakeup_id"]

            async def notified() -> Any:
                while True:
                    page = await client.get(
                        "/api/v1/agents/agent_1/notifications", params={"user_id": "u1"}
                    )
                    assert page.status_code == 200, page.text
                    items = page.json().get("notifications") or []
                    if items:
                        return items[0]
                    await asyncio.sleep(0.1)

            notification = await asyncio.wait_for(notified(), 15)
        assert wakeup_id in str(notification)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(running, 60)
        await delete_stream(settings.nats_url, settings.subject_prefix)
    running.result()
    # The relay let go of its reply inbox on the way out.
    assert daemon.relay is not None
    assert daemon.relay.publisher.closed


async def test_a_dispatched_notification_is_published_before_the_next_tick(settings):
    """The dispatcher's commit wakes the relay: notification.created goes out at once."""
    daemon = Daemon(settings)
    running = asyncio.create_task(daemon.run(install_signals=False))
    nc = await nats.connect(settings.nats_url)
    try:
        created_events: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_created(msg: Any) -> None:
            await created_events.put(msg.data)

        await nc.subscribe(Subjects(settings.subject_prefix).notification_created, cb=on_created)
        await asyncio.wait_for(daemon.ready.wait(), 30)
        assert daemon.api_url is not None
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=daemon.api_url, headers=headers) as client:
            created = await client.post(
                "/api/v1/agents/agent_1/wakeups",
                json={"user_id": "u1", "check_type": "reminder", "intent": "hi", "delay_hours": 0},
            )
            assert created.status_code == 201, created.text
        # The relay's periodic pass is 30 s away; only a wake publishes within 15 s.
        published = await asyncio.wait_for(created_events.get(), 15)
        assert json.loads(published)["event_type"] == "on_wakeup_ready"
    finally:
        await nc.close()
        daemon.request_stop()
        await asyncio.wait_for(running, 60)
        await delete_stream(settings.nats_url, settings.subject_prefix)
    running.result()


async def test_periodic_job_runs_until_no_more_work_and_coalesces_wakes():
    """A job whose step reports more work runs again at once; wakes during a run add one pass."""
    calls = 0
    done = asyncio.Event()
    job: PeriodicLoop

    async def step() -> bool:
        nonlocal calls
        calls += 1
        if calls == 3:
            job.wake()  # during the last pass: one more pass, never a concurrent one
        if calls >= 4:
            done.set()
        return calls < 3

    job = PeriodicLoop("test-job", step, interval_s=60)
    job.start()
    await asyncio.wait_for(done.wait(), 5)
    await job.stop()
    assert calls == 4


async def test_an_async_advance_cut_short_by_a_crash_completes_after_restart(settings):
    """A job row left ``running`` by a killed process is rerun at start-up, once."""
    from delivery.clock import SystemClock
    from delivery.daemon import apply_migrations
    from delivery.store.engine import create_engine
    from delivery.workbench import Pair, create_job, get_job
    from tests.dispatcher import rows

    url = settings.resolved_database_url()
    await asyncio.to_thread(Path(settings.data_dir).mkdir, parents=True)
    await apply_migrations(url, settings)
    engine = create_engine(url)
    pair = Pair("proj_1", "agent_1", "user_1")
    try:
        await rows.project(engine)
        await rows.schedule(engine)
        # What the API wrote before the kill: a running job whose lease is still fresh.
        await create_job(engine, "job_cut", pair, 48, SystemClock().now(), owner="api_killed")

        daemon = Daemon(settings)
        running = asyncio.create_task(daemon.run(install_signals=False))
        try:
            await asyncio.wait_for(daemon.ready.wait(), 30)

            async def succeeded() -> dict[str, Any]:
                while True:
                    job = await get_job(engine, pair.project_id, "job_cut", SystemClock().now())
                    if job["status"] != "running":
                        return job
                    await asyncio.sleep(0.1)

            job = await asyncio.wait_for(succeeded(), 15)
        finally:
            daemon.request_stop()
            await asyncio.wait_for(running, 60)
            await delete_stream(settings.nats_url, settings.subject_prefix)
        running.result()
        assert job["status"] == "succeeded", job
        assert len(job["result"]["wakeups_executed"]) == 2
        assert await rows.count(engine, NotificationRow) == 2
    finally:
        await engine.dispose()
