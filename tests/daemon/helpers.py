"""
Builders for daemon tests: projects, schedules and wakeups written straight to the
tables, and the parts of the crash tests that run a real ``delivery run`` child.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.cadence import compile_schedule, next_fire
from delivery.store.tables import (
    FireRow,
    NotificationRow,
    OutboxRow,
    ProjectRow,
    ScheduleRow,
    WakeupRow,
)

PROJECTS = ProjectRow.__table__  # type: ignore[attr-defined]
SCHEDULES = ScheduleRow.__table__  # type: ignore[attr-defined]
FIRES = FireRow.__table__  # type: ignore[attr-defined]
WAKEUPS = WakeupRow.__table__  # type: ignore[attr-defined]
OUTBOX = OutboxRow.__table__  # type: ignore[attr-defined]
NOTIFICATIONS = NotificationRow.__table__  # type: ignore[attr-defined]

ZONES = ("UTC", "Asia/Singapore", "America/New_York", "Europe/Berlin", "Australia/Lord_Howe")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def schedule_row(
    schedule_id: str,
    *,
    cadence: dict[str, Any],
    created_at: datetime,
    active_window: dict[str, Any] | None = None,
    next_fire_at: datetime | None = None,
    last_fire_at: datetime | None = None,
    ends_at: datetime | None = None,
    project_id: str = "prj_test",
) -> dict[str, Any]:
    """A schedules row as the API would write it (next_fire_at computed unless given)."""
    compiled = compile_schedule(cadence, active_window, ends_at=ends_at, created_at=created_at)
    if next_fire_at is None:
        next_fire_at = next_fire(compiled, created_at)
    return {
        "id": schedule_id,
        "project_id": project_id,
        "agent_id": "agent_1",
        "user_id": f"user_{schedule_id}",
        "cadence_type": "cron" if "cron" in cadence else "simple",
        "cadence_json": canonical(compiled.cadence),
        "timezone": cadence["timezone"],
        "active_window_json": canonical(compiled.active_window) if compiled.active_window else None,
        "intent": "check in",
        "check_type": "reminder",
        "starts_at": None,
        "ends_at": ends_at,
        "anchor_at": compiled.anchor,
        "enabled": True,
        "next_fire_at": next_fire_at,
        "last_fire_at": last_fire_at,
        "version": 1,
        "created_at": created_at,
        "updated_at": created_at,
    }


def daily(time: str, zone: str = "UTC") -> dict[str, Any]:
    return {"simple": {"frequency": "daily", "times": [time]}, "timezone": zone}


def due_daily_rows(count: int, due_at: datetime, created_at: datetime) -> list[dict[str, Any]]:
    """``count`` daily schedules in mixed zones, all due at ``due_at`` (whole minute)."""
    rows = []
    for i in range(count):
        zone = ZONES[i % len(ZONES)]
        from zoneinfo import ZoneInfo

        local = due_at.astimezone(ZoneInfo(zone))
        rows.append(
            schedule_row(
                f"sch_{i:06d}",
                cadence=daily(f"{local:%H:%M}", zone),
                created_at=created_at,
                next_fire_at=due_at,
            )
        )
    return rows


async def add_project(engine: AsyncEngine, project_id: str = "prj_test") -> None:
    async with engine.begin() as conn:
        await conn.execute(
            PROJECTS.insert().values(id=project_id, name=project_id, created_at=datetime.now(UTC))
        )


async def add_schedules(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as conn:
        for start in range(0, len(rows), 2000):
            await conn.execute(SCHEDULES.insert(), rows[start : start + 2000])


def wakeup_row(wakeup_id: str, scheduled_at: datetime, status: str = "pending") -> dict[str, Any]:
    return {
        "id": wakeup_id,
        "project_id": "prj_test",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "check_type": "reminder",
        "intent": "say hi",
        "scheduled_at": scheduled_at,
        "status": status,
        "created_at": scheduled_at - timedelta(hours=1),
    }


async def count(engine: AsyncEngine, table: Any, *where: Any) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one()
        )


async def rows(engine: AsyncEngine, stmt: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(stmt)).all())


async def delete_stream(nats_url: str, prefix: str) -> None:
    """Remove a test's stream from the (possibly shared) server, if a process created it."""
    import nats
    from nats.js.errors import NotFoundError

    from delivery.bus.subjects import Subjects

    nc = await nats.connect(nats_url)
    try:
        with contextlib.suppress(NotFoundError):
            await nc.jetstream().delete_stream(Subjects(prefix).stream)
    finally:
        await nc.close()


async def assert_one_notification_each(engine: AsyncEngine, sources: set[str]) -> None:
    """Every id of ``sources`` has exactly one notification, and nothing else has one."""
    made = [r.source_id for r in await rows(engine, select(NOTIFICATIONS.c.source_id))]
    assert len(made) == len(sources)
    assert set(made) == sources


async def outbox_rows_per_message(engine: AsyncEngine, *where: Any) -> set[int]:
    """How many outbox rows each message id matching ``where`` has (``{1}``: one each)."""
    async with engine.connect() as conn:
        counts = await conn.execute(
            select(func.count()).select_from(OUTBOX).where(*where).group_by(OUTBOX.c.msg_id)
        )
        return set(counts.scalars())


def daemon_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``delivery run`` child: none of ours inherited, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        DELIVERY_DATA_DIR=str(data_dir),
        DELIVERY_PORT="0",
        # Small claims stretch a burst over many transactions, so a kill lands in the
        # middle of it.
        DELIVERY_CLAIM_BATCH="50",
        DELIVERY_LOG_JSON="true",
    )
    env.update(extra)
    return env


async def crash_database(
    kind: str, data_dir: Path, nats_url: str, subject_prefix: str
) -> tuple[str, str | None, dict[str, str]]:
    """
    The database of a crash test: the embedded SQLite in ``data_dir`` (with its own
    nats-server), or a fresh PostgreSQL database on the shared NATS. Returns its URL,
    the PostgreSQL URL to drop afterwards (or None) and the settings for the child.
    """
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{data_dir / 'delivery.db'}", None, {}
    from tests.fixtures.db import create_pg_database

    url = await asyncio.to_thread(create_pg_database)
    return (
        url,
        url,
        {
            "DELIVERY_DATABASE_URL": url,
            "DELIVERY_NATS_URL": nats_url,
            "DELIVERY_SUBJECT_PREFIX": subject_prefix,
            "DELIVERY_SECRET_KEY": "crash-test-key",
        },
    )


async def drop_crash_database(pg_url: str | None, nats_url: str, subject_prefix: str) -> None:
    """Remove what :func:`crash_database` made on the shared services (nothing for SQLite)."""
    if pg_url is None:
        return
    from tests.fixtures.db import drop_pg_database

    await delete_stream(nats_url, subject_prefix)
    await asyncio.to_thread(drop_pg_database, pg_url)


async def start_daemon(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    """``delivery run`` as a real child process, its output appended to ``log``."""
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


async def stop_daemon(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, and the shutdown is clean (exit status 0 within 30 s)."""
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def reap_daemon(proc: asyncio.subprocess.Process | None) -> None:
    """Kill a child a failed test left running, so it does not outlive the test."""
    if proc is not None and proc.returncode is None:
        proc.kill()
        await proc.wait()


async def wait_for(predicate: Callable[[], Awaitable[bool]], within: float) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds."""

    async def poll() -> None:
        # Another process writes the database: there is no event to wait on.
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), within)


async def assert_stamped_have_notifications(engine: AsyncEngine, *where: Any) -> None:
    """
    Every outbox row matching ``where`` stamped sent has its notification: the stamp
    commits in the notification's transaction, so a kill cannot separate the two.
    """
    stamped = await rows(
        engine, select(OUTBOX.c.msg_id).where(*where, OUTBOX.c.sent_at.is_not(None))
    )
    made = {r.source_id for r in await rows(engine, select(NOTIFICATIONS.c.source_id))}
    assert {r.msg_id for r in stamped} <= made
