"""
The polling read over a queue full of expired, not yet swept messages (SQLite).

A pending message past its deadline (``expires_at``) is hidden from the queue at once,
swept or not; until the expiry sweep marks it ``expired`` it still sits in the queue's
index range, and the read filters it out row by row. The SDK's poll runs on the event
loop's own SQLite connection (``delivery.store.engine.read_on_loop``), so that filtering
holds the loop. This seeds ``--expired`` expired pending rows and ``--live`` live ones
for one (agent, user), then polls the first page ``--reads`` times through
``SqlNotificationStore.list_queue`` (the API's path) and prints per read: wall time,
process CPU (every thread), and the time spent in ``read_on_loop``: the time the event
loop was held, when no other request could run.

    .venv/bin/python bench/bench_queue_expired.py                   # 100k expired, 5 live
    .venv/bin/python bench/bench_queue_expired.py --expired 20000 --reads 50
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from delivery.store import notifications
from delivery.store.bulk import insert_notifications
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.notifications import SqlNotificationStore
from delivery.store.sql import SqlStore

START = datetime(2026, 5, 1, tzinfo=UTC)


def _row(project_id: str, n: int, created: datetime, expires: datetime | None) -> dict[str, Any]:
    return {
        "id": f"msg_{n:08d}",
        "project_id": project_id,
        "agent_id": "a1",
        "user_id": "u1",
        "source_type": "event",
        "source_id": f"evt_{n:08d}",
        "event_type": "on_event",
        "check_type": "reminder",
        "generated_message": f"message {n}",
        "status": "pending",
        "ack_status": "pending",
        "fire_at": created,
        "created_at": created,
        "expires_at": expires,
        "payload_json": "{}",
    }


async def _seed(url: str, expired: int, live: int) -> tuple[str, datetime]:
    """``expired`` rows whose deadline passed, then ``live`` ones; the instant to read at."""
    await migrate(url)
    engine = create_engine(url)
    try:
        project = await SqlStore(engine).keys.ensure_project("bench", START)
        batch: list[dict[str, Any]] = []
        for n in range(expired + live):
            created = START + timedelta(milliseconds=n)
            deadline = created + timedelta(minutes=5) if n < expired else None
            batch.append(_row(project.id, n, created, deadline))
            if len(batch) == 5000:
                async with engine.begin() as conn:
                    await insert_notifications(conn, batch)
                batch = []
        if batch:
            async with engine.begin() as conn:
                await insert_notifications(conn, batch)
        async with engine.begin() as conn:
            await conn.exec_driver_sql("ANALYZE")
        now = START + timedelta(milliseconds=expired + live) + timedelta(hours=1)
        return project.id, now
    finally:
        await engine.dispose()


def _timing_loop_reads(held: list[float]) -> None:
    """Wrap the queue's ``read_on_loop`` to record how long each call held the loop."""
    original = notifications.read_on_loop

    def timed(engine: Any, fn: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(engine, fn)
        finally:
            held.append(time.perf_counter() - started)

    notifications.read_on_loop = timed


async def _run(expired: int, live: int, reads: int, limit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        project_id, now = await _seed(url, expired, live)
        engine = create_engine(url)
        try:
            store = SqlNotificationStore(engine)

            async def page() -> list[str]:
                rows = await store.list_queue(
                    project_id, "a1", status="pending", user_id="u1", limit=limit, now=now
                )
                return [r["id"] for r in rows]

            first = await page()
            assert len(first) == min(live, limit), first
            walls: list[float] = []
            held: list[float] = []
            _timing_loop_reads(held)
            cpu_started = time.process_time()
            for _ in range(reads):
                started = time.perf_counter()
                assert await page() == first
                walls.append(time.perf_counter() - started)
            cpu = time.process_time() - cpu_started
        finally:
            await engine.dispose()
    print(
        f"expired={expired} live={live} limit={limit} reads={reads}: "
        f"wall p50 {statistics.median(walls) * 1000:.2f} ms, "
        f"cpu {cpu / reads * 1000:.2f} ms/read, "
        f"loop held p50 {statistics.median(held) * 1000:.2f} ms "
        f"max {max(held) * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expired", type=int, default=100_000)
    parser.add_argument("--live", type=int, default=5)
    parser.add_argument("--reads", type=int, default=30)
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(_run(args.expired, args.live, args.reads, args.limit))


if __name__ == "__main__":
    main()
