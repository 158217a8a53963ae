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
import signal
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
    assert_stamped_have_notifications,
    count,
    crash_database,
    daemon_env,
    drop_crash_database,
    due_daily_rows,
    outbox_rows_per_message,
    reap_daemon,
    rows,
    start_daemon,
    stop_daemon,
    wait_for,
)

TOTAL = 3000
FIRE_ROWS = OUTBOX.c.subject.like("%.fire.created")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sigkill_with_fires_handed_off_gives_one_notification_each(
    kind: str, tmp_path: Path, nats_url: str, subject_prefix: str
) -> None:
    """Fires held for the killed dispatcher are relayed after the restart, once each."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    url, pg_url, extra = await crash_database(kind, data_dir, nats_url, subject_prefix)
    env = daemon_env(data_dir, **extra)
    await migrate(url)
    engine = create_engine(url)
    log = tmp_path / "run.log"
    proc: asyncio.subprocess.Process | None = None
    held = (FIRE_ROWS, OUTBOX.c.sent_at.is_(None), OUTBOX.c.available_at > OUTBOX.c.created_at)
    try:
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        await add_project(engine)
        await add_schedules(engine, due_daily_rows(TOTAL, now, now - timedelta(days=1)))

        proc = await start_daemon(env, log)

        async def mid_handoff() -> bool:
            # Some notifications made, and some fires waiting in the killed
            # process's queue (their rows held, not yet stamped).
            return await count(engine, NOTIFICATIONS) > 0 and await count(engine, OUTBOX, *held) > 0

        await wait_for(mid_handoff, within=90)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        notifications_at_kill = await count(engine, NOTIFICATIONS)
        held_at_kill = await count(engine, OUTBOX, *held)
        assert notifications_at_kill < TOTAL, "the burst finished before the kill"
        assert held_at_kill > 0, "no fire was waiting in the hand-off at the kill"
        await assert_stamped_have_notifications(engine, FIRE_ROWS)

        # The embedded nats-server (SQLite) follows its parent down; give it a moment.
        await asyncio.sleep(1.0)
        proc = await start_daemon(env, log)

        async def all_done() -> bool:
            unsent = await count(engine, OUTBOX, FIRE_ROWS, OUTBOX.c.sent_at.is_(None))
            return unsent == 0 and await count(engine, NOTIFICATIONS) >= TOTAL

        # PostgreSQL: the held rows wait for the grace (30 s) before the relay takes them.
        await wait_for(all_done, within=240)
        await stop_daemon(proc)
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
        await reap_daemon(proc)
        await engine.dispose()
        await drop_crash_database(pg_url, nats_url, subject_prefix)
