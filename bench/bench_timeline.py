"""
User timeline latency (p50 / p99) with 10,000 events for the user, among 100k rows of
other users, on SQLite and on PostgreSQL; the floor is the notifications list (one
indexed range read) on the same server, same user, same page size.

The user's story: one schedule's 100 changes, 3,000 fires (500 skipped), 2,500 messages
composed (1,500 of them consumed: 4,000 events), 2,000 webhook attempts, 500
channel attempts, 200 wakeups and 200 trigger events. Each request asks a page of 50
from a random point of the history (``since``), in a random order, or the first
page; ``delivery web`` serves it in its own process.

    .venv/bin/python bench/bench_timeline.py             # 2,000 requests per database
    .venv/bin/python bench/bench_timeline.py --quick     # smoke: 200 requests
    .venv/bin/python bench/bench_timeline.py --db sqlite --requests 5000 --concurrency 4
"""

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Table
from sqlalchemy.engine import make_url

from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore
from delivery.store.tables import (
    CHANNEL_ATTEMPTS,
    EVENTS,
    FIRES,
    NOTIFICATIONS,
    SCHEDULE_CHANGES,
    SCHEDULES,
    WAKEUPS,
    WEBHOOK_ATTEMPTS,
)

PG_ADMIN_URL = os.environ.get(
    "DELIVERY_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
START = datetime(2026, 1, 1, tzinfo=UTC)
AGENT, USER = "agent-1", "user-1"
OTHERS = 50
TARGET_P99_MS = 50.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(_asyncpg_dsn(PG_ADMIN_URL))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _story(project: str, user: str, tag: str, scale: int = 1) -> dict[Table, list[dict[str, Any]]]:
    """One user's rows: 10,000 timeline events at ``scale`` 1."""
    at: Callable[[int], datetime] = lambda n: START + timedelta(hours=n)  # noqa: E731
    owner = {"project_id": project, "agent_id": AGENT, "user_id": user}
    rows: dict[Table, list[dict[str, Any]]] = {}
    rows[SCHEDULES] = [
        {
            "id": f"sch_{tag}",
            **owner,
            "cadence_type": "simple",
            "cadence_json": '{"simple":{"frequency":"interval_hours","interval_hours":1}}',
            "timezone": "Europe/Berlin",
            "active_window_json": '{"hours":{"end":"22:00","start":"08:00"}}',
            "intent": "check in",
            "check_type": "reminder",
            "anchor_at": START,
            "next_fire_at": at(3000),
            "version": 100,
            "created_at": START,
            "updated_at": START,
        }
    ]
    rows[SCHEDULE_CHANGES] = [
        {
            "id": f"chg_{tag}_{n:06d}",
            "schedule_id": f"sch_{tag}",
            **owner,
            "kind": "created" if n == 0 else "updated",
            "fields_json": '["intent"]',
            "timezone": "Europe/Berlin",
            "version": n + 1,
            "changed_at": at(n * 30),
        }
        for n in range(100 // scale)
    ]
    rows[FIRES] = [
        {
            "id": f"fire_{tag}_{n:06d}",
            "schedule_id": f"sch_{tag}",
            **owner,
            "fire_at": at(n),
            "status": "skipped" if n % 6 == 5 else "fired",
            "skip_reason": "outside_active_window" if n % 6 == 5 else None,
            "created_at": at(n),
        }
        for n in range(3000 // scale)
    ]
    fired = [f for f in rows[FIRES] if f["status"] == "fired"][: 2500 // scale]
    rows[NOTIFICATIONS] = [
        {
            "id": f"msg_{tag}_{n:06d}",
            **owner,
            "source_type": "schedule",
            "source_id": f["id"],
            "schedule_id": f"sch_{tag}",
            "event_type": "on_recurring_event_due",
            "check_type": "reminder",
            "intent": "check in",
            "generated_message": "How are you feeling today?",
            "status": "consumed" if n < 1500 // scale else "pending",
            "fire_at": f["fire_at"],
            "payload_json": "{}",
            "created_at": f["fire_at"] + timedelta(seconds=1),
            "consumed_at": f["fire_at"] + timedelta(minutes=5) if n < 1500 // scale else None,
        }
        for n, f in enumerate(fired)
    ]
    rows[WEBHOOK_ATTEMPTS] = [
        {
            "id": f"wha_{tag}_{n:06d}",
            "delivery_id": f"whd_{tag}_{n // 2:06d}",
            "project_id": project,
            "agent_id": AGENT,
            "user_id": user,
            "event_type": "on_recurring_event_due",
            "event_id": f"msg_{tag}_{n // 2:06d}",
            "attempt_number": n % 2 + 1,
            "webhook_url": "https://hooks.example.com/delivery",
            "status": "failed" if n % 2 == 0 else "success",
            "response_code": 500 if n % 2 == 0 else 200,
            "duration_ms": 40,
            "created_at": at(n // 2) + timedelta(seconds=2 + n % 2),
        }
        for n in range(2000 // scale)
    ]
    rows[CHANNEL_ATTEMPTS] = [
        {
            "id": f"cha_{tag}_{n:06d}",
            **owner,
            "notification_id": f"msg_{tag}_{n:06d}",
            "kind": "email",
            "destination": "u***@example.com",
            "status": "sent",
            "created_at": at(n) + timedelta(seconds=3),
        }
        for n in range(500 // scale)
    ]
    rows[WAKEUPS] = [
        {
            "id": f"wk_{tag}_{n:06d}",
            **owner,
            "check_type": "check_in",
            "intent": "say hi",
            "scheduled_at": at(n * 15),
            "status": "executed",
            "created_at": at(n * 15) - timedelta(minutes=30),
        }
        for n in range(200 // scale)
    ]
    rows[EVENTS] = [
        {
            "id": f"evt_{tag}_{n:06d}",
            **owner,
            "event_type": "milestone",
            "status": "dispatched",
            "created_at": at(n * 15) + timedelta(minutes=7),
        }
        for n in range(200 // scale)
    ]
    return rows


async def _seed(url: str) -> str:
    """Migrate; the user's 10,000 events and ``OTHERS`` other users' 2,000 rows each."""
    await migrate(url)
    engine = create_engine(url)
    try:
        store = SqlStore(engine)
        project = await store.keys.ensure_project("bench", START)
        key = await store.keys.create_api_key(project.id, START)
        stories = [_story(project.id, USER, "u")]
        stories += [_story(project.id, f"other-{n}", f"o{n}", scale=5) for n in range(OTHERS)]
        for story in stories:
            async with engine.begin() as conn:
                for table, rows in story.items():
                    for i in range(0, len(rows), 2000):
                        await conn.execute(table.insert(), rows[i : i + 2000])
        if url.startswith("postgresql"):
            async with engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE")
                await conn.commit()
        return key
    finally:
        await engine.dispose()


async def _wait_ready(base_url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"delivery web exited with {proc.returncode}")
            try:
                async with session.get(f"{base_url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("delivery web did not become ready")


def _timeline_path(rng: random.Random) -> str:
    query = f"limit=50&order={rng.choice(['asc', 'desc'])}"
    if rng.random() < 0.75:
        since = START + timedelta(hours=rng.randrange(3000))
        query += f"&since={since.isoformat().replace('+00:00', 'Z')}"
    return f"/api/v1/agents/{AGENT}/users/{USER}/timeline?{query}"


def _floor_path(_rng: random.Random) -> str:
    return f"/api/v1/agents/{AGENT}/notifications?user_id={USER}&limit=50"


async def _measure(
    base_url: str,
    key: str,
    path: Callable[[random.Random], str],
    *,
    requests: int,
    concurrency: int,
    expect: bytes,
) -> dict[str, float]:
    """``requests`` GETs (after 50 warm-up ones) from ``concurrency`` closed-loop clients."""
    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {key}"}
    rng = random.Random(11)
    remaining = requests + 50

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors, remaining
        while remaining > 0:
            remaining -= 1
            warm = remaining >= requests
            started = time.perf_counter()
            async with session.get(base_url + path(rng), headers=headers) as r:
                body = await r.read()
                ok = r.status == 200 and expect in body
            if not warm:
                latencies.append(time.perf_counter() - started)
                errors += not ok

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


async def _walk(base_url: str, key: str, order: str) -> dict[str, float]:
    """Follow ``next_cursor`` through the whole history; every event must come once."""
    headers = {"Authorization": f"Bearer {key}"}
    params = {"limit": "50", "order": order}
    latencies: list[float] = []
    seen: set[tuple[str, str, str]] = set()
    count = 0
    async with aiohttp.ClientSession() as session:
        while True:
            started = time.perf_counter()
            async with session.get(
                f"{base_url}/api/v1/agents/{AGENT}/users/{USER}/timeline",
                params=params,
                headers=headers,
            ) as r:
                page = await r.json()
            latencies.append(time.perf_counter() - started)
            count += len(page["events"])
            seen |= {(e["at"], e["ref"], e["kind"]) for e in page["events"]}
            if not page["has_more"]:
                break
            params["cursor"] = page["next_cursor"]
    latencies.sort()
    return {
        "pages": len(latencies),
        "events": count,
        "unique": len(seen),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000,
    }


async def _run_one(
    kind: str, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    tmp = tempfile.TemporaryDirectory(prefix="dlv-bench-")
    pg_name = ""
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{Path(tmp.name) / 'delivery.db'}"
    else:
        pg_name = f"dlv_bench_{uuid.uuid4().hex[:10]}"
        await _pg_admin(f'CREATE DATABASE "{pg_name}"')
        url = make_url(PG_ADMIN_URL).set(database=pg_name).render_as_string(hide_password=False)
    proc: subprocess.Popen[bytes] | None = None
    try:
        key = await _seed(url)
        port = _free_port()
        env = {
            **os.environ,
            "DELIVERY_DATABASE_URL": url,
            "DELIVERY_SECRET_KEY": "bench-timeline-key",  # required on PostgreSQL
            "DELIVERY_DATA_DIR": tmp.name,
            "DELIVERY_PORT": str(port),
            "DELIVERY_LOG_LEVEL": "WARNING",
        }
        proc = subprocess.Popen(  # noqa: ASYNC220 - start-up only, outside the measurement
            [sys.executable, "-m", "delivery", "web"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base_url = f"http://127.0.0.1:{port}"
        await _wait_ready(base_url, proc)
        options = {"requests": args.requests, "concurrency": args.concurrency}
        timeline = await _measure(base_url, key, _timeline_path, expect=b'"events":[{', **options)
        floor = await _measure(base_url, key, _floor_path, expect=b'"message_id"', **options)
        walk = await _walk(base_url, key, "desc")
        return timeline, floor, walk
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if pg_name:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        tmp.cleanup()


def main() -> None:
    """Parse arguments, run each database in turn, print the figures, the floor and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 requests")
    args = parser.parse_args()
    if args.quick:
        args.requests = min(args.requests, 200)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(
        f"user timeline: 10,000 events for the user, {OTHERS} other users' rows beside them, "
        f"pages of 50 from random points, {args.requests} requests, "
        f"{args.concurrency} client(s); floor: the notifications list, same user, limit 50; "
        f"target p99 <= {TARGET_P99_MS:g} ms"
    )
    for kind in kinds:
        t, f, w = asyncio.run(_run_one(kind, args))
        verdict = "meets" if t["p99_ms"] <= TARGET_P99_MS else "MISSES"
        print(
            f"{kind:9s} timeline p50 {t['p50_ms']:6.1f} ms  p99 {t['p99_ms']:6.1f} ms  "
            f"max {t['max_ms']:6.1f} ms ({int(t['errors'])} errors) | floor p50 "
            f"{f['p50_ms']:5.1f} ms  p99 {f['p99_ms']:5.1f} ms | ratio p99 "
            f"{t['p99_ms'] / f['p99_ms']:4.1f}x | {verdict} the target "
            f"(load average {os.getloadavg()[0]:.1f})"
        )
        print(
            f"{'':9s} cursor walk, newest first: {int(w['pages'])} pages, {int(w['events'])} "
            f"events, {int(w['unique'])} distinct; p50 {w['p50_ms']:.1f} ms  "
            f"p99 {w['p99_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
