"""
Several schedulers on one PostgreSQL database share the due rows (FOR UPDATE SKIP LOCKED
+ leases) and never produce a fire twice: the unique constraint is never even needed.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from delivery.domain import TickResult
from delivery.scheduler import Scheduler
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from tests.daemon.helpers import (
    FIRES,
    OUTBOX,
    add_project,
    add_schedules,
    count,
    delete_stream,
    due_daily_rows,
    schedule_row,
)

T = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_three_replicas_never_duplicate_a_fire(engine, bus, project, database_url):
    """Three concurrent schedulers with their own engines fire each due tick exactly once."""
    hourly = {"cron": "*/15 * * * *", "timezone": "Asia/Kolkata"}
    rows = due_daily_rows(300, T, T - timedelta(days=1)) + [
        schedule_row(
            f"sch_q{i:04d}", cadence=hourly, created_at=T - timedelta(days=1), next_fire_at=T
        )
        for i in range(150)
    ]
    await add_schedules(engine, rows)
    engines = [create_engine(database_url, pool_size=2) for _ in range(3)]
    replicas = [Scheduler(e, bus.subjects, claim_batch=20) for e in engines]
    steps = [T + timedelta(minutes=m) for m in (0, 15, 30, 45)]

    async def run(replica: Scheduler) -> list[TickResult]:
        results = []
        for now in steps:
            results.append(await replica.drain(now))
            await asyncio.sleep(0)
        return results

    try:
        per_replica = await asyncio.gather(*(run(r) for r in replicas))
    finally:
        for e in engines:
            await e.dispose()
    results = [r for rs in per_replica for r in rs]
    fire_ids = [f for r in results for f in r.fire_ids]
    expected = 300 + 150 * len(steps)
    assert sum(r.conflicts for r in results) == 0
    assert len(fire_ids) == len(set(fire_ids)) == expected
    assert await count(engine, FIRES) == expected
    assert await count(engine, OUTBOX) == expected
    # Work was actually shared, not done by one replica while the others waited.
    assert all(sum(r.claimed for r in rs) > 0 for rs in per_replica)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_three_scheduler_processes_never_duplicate_a_fire(
    database_url, nats_url, subject_prefix, tmp_path
):
    """Three `delivery scheduler` processes on PostgreSQL fire every due schedule exactly once."""
    await migrate(database_url)
    engine = create_engine(database_url)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    total = 1500
    procs: list[asyncio.subprocess.Process] = []
    logs = [tmp_path / f"scheduler{i}.log" for i in range(3)]
    try:
        await add_project(engine)
        await add_schedules(engine, due_daily_rows(total, now, now - timedelta(days=1)))
        env = _env(
            DELIVERY_DATABASE_URL=database_url,
            DELIVERY_SECRET_KEY="replicas-test-key",
            DELIVERY_NATS_URL=nats_url,
            DELIVERY_SUBJECT_PREFIX=subject_prefix,
            DELIVERY_CLAIM_BATCH="50",
            DELIVERY_LOG_LEVEL="DEBUG",
            DELIVERY_LOG_JSON="true",
        )
        for path in logs:
            with path.open("wb") as out:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "delivery",
                        "scheduler",
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

        async def all_sent() -> None:
            while True:
                async with engine.connect() as conn:
                    unsent = (
                        await conn.execute(
                            select(func.count())
                            .select_from(OUTBOX)
                            .where(OUTBOX.c.sent_at.is_(None))
                        )
                    ).scalar_one()
                if await count(engine, FIRES) == total and unsent == 0:
                    return
                await asyncio.sleep(0.2)

        await asyncio.wait_for(all_sent(), timeout=120)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert await count(engine, OUTBOX) == total
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await engine.dispose()
        await delete_stream(nats_url, subject_prefix)
    ticks = []
    for path in logs:
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                assert entry["event"] != "fire_conflicts", entry
                if entry["event"] == "tick":
                    ticks.append(entry)
    assert sum(t["fired"] for t in ticks) == total
    assert sum(t["conflicts"] for t in ticks) == 0
    assert len({t["scheduler"] for t in ticks if t["fired"]}) >= 2, "work was not shared"
