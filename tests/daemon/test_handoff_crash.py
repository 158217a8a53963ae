"""
Crash with the in-process hand-off: SIGKILL ``delivery run`` while fires handed from its
scheduler to its dispatcher wait in memory (their ``fire.created`` rows held, unsent),
restart it, and check that every fire has exactly one notification and every held row
ends sent.

On the embedded SQLite the restarted process is the only one on the database, so it
releases the held rows at once; on PostgreSQL (an external NATS) they wait out the
grace, then the relay publishes them and the dispatcher consumes them from JetStream.
"""

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from tests.daemon.helpers import (
    FIRES,
    NOTIFICATIONS,
    OUTBOX,
    add_project,
    add_schedules,
    assert_one_notification_each,
    count,
    delete_stream,
    due_daily_rows,
    outbox_rows_per_message,
    rows,
)
from tests.daemon.test_crash import _wait_for
from tests.fixtures.db import create_pg_database, drop_pg_database

TOTAL = 3000
FIRE_ROWS = OUTBOX.c.subject.like("%.fire.created")


def _env(data_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        DELIVERY_DATA_DIR=str(data_dir),
        DELIVERY_PORT="0",
        # Small claims stretch the burst over many transactions, so the kill lands
        # while handed-off fires are still queued.
        DELIVERY_CLAIM_BATCH="50",
        DELIVERY_LOG_JSON="true",
        **extra,
    )
    return env


async def _start(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "delivery",
            "run",
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sigkill_with_fires_handed_off_gives_one_notification_each(
    kind: str, tmp_path: Path, nats_url: str, subject_prefix: str
) -> None:
    """Fires held for the killed dispatcher are relayed after the restart, once each."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    extra: dict[str, str] = {}
    pg_url: str | None = None
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{data_dir / 'delivery.db'}"
    else:
        pg_url = url = await asyncio.to_thread(create_pg_database)
        extra = {
            "DELIVERY_DATABASE_URL": url,
            "DELIVERY_NATS_URL": nats_url,
            "DELIVERY_SUBJECT_PREFIX": subject_prefix,
            "DELIVERY_SECRET_KEY": "handoff-crash-test-key",
        }
    env = _env(data_dir, extra)
    await migrate(url)
    engine = create_engine(url)
    log = tmp_path / "run.log"
    proc: asyncio.subprocess.Process | None = None
    held = (FIRE_ROWS, OUTBOX.c.sent_at.is_(None), OUTBOX.c.available_at > OUTBOX.c.created_at)
    try:
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        await add_project(engine)
        await add_schedules(engine, due_daily_rows(TOTAL, now, now - timedelta(days=1)))

        proc = await _start(env, log)

        async def mid_handoff() -> bool:
            # Some notifications made, and some fires waiting in the killed
            # process's queue (their rows held, not yet stamped).
            return await count(engine, NOTIFICATIONS) > 0 and await count(engine, OUTBOX, *held) > 0

        await _wait_for(mid_handoff, within=90)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        notifications_at_kill = await count(engine, NOTIFICATIONS)
        held_at_kill = await count(engine, OUTBOX, *held)
        assert notifications_at_kill < TOTAL, "the burst finished before the kill"
        assert held_at_kill > 0, "no fire was waiting in the hand-off at the kill"
        # The stamp commits with the notification: every stamped fire has one.
        stamped = await rows(
            engine,
            select(OUTBOX.c.msg_id).where(FIRE_ROWS, OUTBOX.c.sent_at.is_not(None)),
        )
        made = {r.source_id for r in await rows(engine, select(NOTIFICATIONS.c.source_id))}
        assert {r.msg_id for r in stamped} <= made

        # The embedded nats-server (SQLite) follows its parent down; give it a moment.
        await asyncio.sleep(1.0)
        proc = await _start(env, log)

        async def all_done() -> bool:
            unsent = await count(engine, OUTBOX, FIRE_ROWS, OUTBOX.c.sent_at.is_(None))
            return unsent == 0 and await count(engine, NOTIFICATIONS) >= TOTAL

        # PostgreSQL: the held rows wait for the grace (30 s) before the relay takes them.
        await _wait_for(all_done, within=240)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        proc = None

        fired = {
            r.id for r in await rows(engine, select(FIRES.c.id).where(FIRES.c.status == "fired"))
        }
        assert len(fired) == TOTAL
        await assert_one_notification_each(engine, fired)
        assert await outbox_rows_per_message(engine, FIRE_ROWS) == {1}
        if kind == "sqlite":
            assert b'"handoff_released"' in log.read_bytes()
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await engine.dispose()
        if pg_url is not None:
            await delete_stream(nats_url, subject_prefix)
            await asyncio.to_thread(drop_pg_database, pg_url)
