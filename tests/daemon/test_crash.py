"""
Crash: SIGKILL a ``delivery run`` process (embedded SQLite + its own nats-server) in the
middle of a burst of due fires, restart it on the same data, and check that every fire
has exactly one notification: no fire is lost, none produces two.
"""

import asyncio
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
from sqlalchemy import select

from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from tests.daemon.helpers import (
    FIRES,
    NOTIFICATIONS,
    add_project,
    add_schedules,
    assert_one_notification_each,
    count,
    daemon_env,
    due_daily_rows,
    reap_daemon,
    rows,
    start_daemon,
    stop_daemon,
    wait_for,
)

TOTAL = 3000


def _nats_children(store: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("nats-server" in part for part in cmdline[:1]) and str(store) in cmdline:
            found.append(proc)
    return found


@pytest.mark.slow
async def test_sigkill_mid_burst_then_restart_gives_one_notification_per_fire(tmp_path):
    """Every fire of a burst interrupted by SIGKILL ends with exactly one notification."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite+aiosqlite:///{data_dir / 'delivery.db'}"
    await migrate(url)
    engine = create_engine(url)
    env = daemon_env(data_dir)
    log = tmp_path / "run.log"
    proc: asyncio.subprocess.Process | None = None
    try:
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        await add_project(engine)
        await add_schedules(engine, due_daily_rows(TOTAL, now, now - timedelta(days=1)))

        proc = await start_daemon(env, log)

        async def mid_burst() -> bool:
            return await count(engine, NOTIFICATIONS) > 0

        await wait_for(mid_burst, within=90)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        fires_at_kill = await count(engine, FIRES)
        notifications_at_kill = await count(engine, NOTIFICATIONS)
        assert notifications_at_kill < TOTAL, "the burst finished before the kill"

        # The embedded nats-server follows its parent down (PR_SET_PDEATHSIG).
        store = data_dir / "nats"

        async def nats_gone() -> bool:
            return not _nats_children(store)

        await wait_for(nats_gone, within=15)

        proc = await start_daemon(env, log)

        async def all_done() -> bool:
            return await count(engine, NOTIFICATIONS) >= TOTAL

        # Messages the killed dispatcher had fetched but not acked come back after
        # the consumer's ack_wait (30 s, delivery.dispatcher.app.TEMPLATE_ACK_WAIT_S).
        await wait_for(all_done, within=240)
        await stop_daemon(proc)
        proc = None

        fired = {
            r.id for r in await rows(engine, select(FIRES.c.id).where(FIRES.c.status == "fired"))
        }
        assert len(fired) == TOTAL
        await assert_one_notification_each(engine, fired)
        assert await count(engine, FIRES, FIRES.c.status == "skipped") == 0
        assert fires_at_kill <= TOTAL
    finally:
        await reap_daemon(proc)
        await engine.dispose()
