"""
Crash: SIGKILL a ``delivery run`` process (embedded SQLite + its own nats-server) in the
middle of a burst of due fires, restart it on the same data, and check that every fire
has exactly one notification: no fire is lost, none produces two.
"""

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
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
    due_daily_rows,
    rows,
)

TOTAL = 3000


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        DELIVERY_DATA_DIR=str(data_dir),
        DELIVERY_PORT="0",
        # Small batches stretch the burst over many transactions, so the kill
        # lands in the middle of it.
        DELIVERY_CLAIM_BATCH="50",
        DELIVERY_LOG_JSON="true",
    )
    return env


async def _start(data_dir: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "delivery",
            "run",
            env=_env(data_dir),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _nats_children(store: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any("nats-server" in part for part in cmdline[:1]) and str(store) in cmdline:
            found.append(proc)
    return found


async def _wait_for(predicate: Callable[[], Awaitable[bool]], within: float) -> None:
    async def poll() -> None:
        # Another process writes the database: there is no event to wait on.
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), within)


@pytest.mark.slow
async def test_sigkill_mid_burst_then_restart_gives_one_notification_per_fire(tmp_path):
    """Every fire of a burst interrupted by SIGKILL ends with exactly one notification."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url = f"sqlite+aiosqlite:///{data_dir / 'delivery.db'}"
    await migrate(url)
    engine = create_engine(url)
    log = tmp_path / "run.log"
    proc: asyncio.subprocess.Process | None = None
    try:
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        await add_project(engine)
        await add_schedules(engine, due_daily_rows(TOTAL, now, now - timedelta(days=1)))

        proc = await _start(data_dir, log)

        async def mid_burst() -> bool:
            return await count(engine, NOTIFICATIONS) > 0

        await _wait_for(mid_burst, within=90)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        fires_at_kill = await count(engine, FIRES)
        notifications_at_kill = await count(engine, NOTIFICATIONS)
        assert notifications_at_kill < TOTAL, "the burst finished before the kill"

        # The embedded nats-server follows its parent down (PR_SET_PDEATHSIG).
        store = data_dir / "nats"

        async def nats_gone() -> bool:
            return not _nats_children(store)

        await _wait_for(nats_gone, within=15)

        proc = await _start(data_dir, log)

        async def all_done() -> bool:
            return await count(engine, NOTIFICATIONS) >= TOTAL

        # Messages the killed dispatcher had fetched but not acked come back after
        # the consumer's ack_wait (30 s, delivery.dispatcher.app.TEMPLATE_ACK_WAIT_S).
        await _wait_for(all_done, within=240)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        proc = None

        fired = {
            r.id for r in await rows(engine, select(FIRES.c.id).where(FIRES.c.status == "fired"))
        }
        assert len(fired) == TOTAL
        await assert_one_notification_each(engine, fired)
        assert await count(engine, FIRES, FIRES.c.status == "skipped") == 0
        assert fires_at_kill <= TOTAL
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await engine.dispose()
