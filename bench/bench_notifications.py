"""
Notifications list latency (p50 / p99) and requests/s at 64 concurrent clients, with
100k pending notifications in the store, on SQLite and on PostgreSQL.

The API runs as ``delivery web`` in its own process (one uvicorn worker); the load
generator (aiohttp, because httpx's pool collapses under concurrency)
runs here. Both share the machine, so the figures are a floor, not a ceiling.

    .venv/bin/python bench/bench_notifications.py            # 100k rows, 10 s per database
    .venv/bin/python bench/bench_notifications.py --quick    # smoke: 5k rows, 2 s
    .venv/bin/python bench/bench_notifications.py --db sqlite --rows 100000 --seconds 20
"""

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
import psutil  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from delivery.store.bulk import insert_notifications
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore

PG_ADMIN_URL = os.environ.get(
    "DELIVERY_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
AGENTS = 20
USERS = 500
START = datetime(2026, 5, 1, tzinfo=UTC)


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


async def _seed(url: str, rows: int) -> tuple[str, str]:
    """Migrate, create a project and key, and insert ``rows`` pending notifications."""
    await migrate(url)
    engine = create_engine(url)
    try:
        store = SqlStore(engine)
        project = await store.keys.ensure_project("bench", START)
        key = await store.keys.create_api_key(project.id, START)
        batch: list[dict[str, Any]] = []
        for n in range(rows):
            agent, user = f"agent-{n % AGENTS}", f"user-{(n // AGENTS) % USERS}"
            created = START + timedelta(milliseconds=n)
            batch.append(
                {
                    "id": f"msg_{n:08d}",
                    "project_id": project.id,
                    "agent_id": agent,
                    "user_id": user,
                    "source_type": "schedule",
                    "source_id": f"fire_{n:08d}",
                    "schedule_id": f"sch_{n % 1000}",
                    "wakeup_id": None,
                    "trigger_event_id": None,
                    "event_type": "on_recurring_event_due",
                    "check_type": "reminder",
                    "intent": "check in on how the user is feeling",
                    "generated_message": f"Good morning! How are you feeling today? ({n})",
                    "status": "pending",
                    "error": None,
                    "fire_at": created,
                    "payload_json": json.dumps({"message_id": f"msg_{n:08d}"}),
                    "ack_status": "pending",
                    "acknowledged_at": None,
                    "created_at": created,
                    "consumed_at": None,
                }
            )
            if len(batch) == 5000:
                async with engine.begin() as conn:
                    await insert_notifications(conn, batch)
                batch = []
        if batch:
            async with engine.begin() as conn:
                await insert_notifications(conn, batch)
        if url.startswith("postgresql"):
            async with engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE notifications")
                await conn.commit()
        return project.id, key
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


async def _load(
    base_url: str, key: str, *, concurrency: int, seconds: float, limit: int
) -> dict[str, float]:
    """Run ``concurrency`` closed-loop clients for ``seconds``; return latency figures."""
    latencies: list[float] = []
    errors = 0
    warmup_until = time.monotonic() + min(1.0, seconds / 4)
    stop_at = warmup_until + seconds
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    rng = random.Random(7)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while (now := time.monotonic()) < stop_at:
            agent = f"agent-{rng.randrange(AGENTS)}"
            query = f"limit={limit}"
            if rng.random() < 0.5:
                query += f"&user_id=user-{rng.randrange(USERS)}"
            started = time.perf_counter()
            async with session.get(
                f"{base_url}/api/v1/agents/{agent}/notifications?{query}", headers=headers
            ) as r:
                body = await r.read()
                ok = r.status == 200 and body.startswith(b'{"notifications":[')
            elapsed = time.perf_counter() - started
            if now >= warmup_until:
                latencies.append(elapsed)
                if not ok:
                    errors += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.monotonic()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.monotonic() - max(began, warmup_until)
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "max_ms": latencies[-1] * 1000,
    }


async def _run_one(kind: str, args: argparse.Namespace) -> dict[str, float]:
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
        seeded = time.perf_counter()
        _, key = await _seed(url, args.rows)
        seed_s = time.perf_counter() - seeded
        port = _free_port()
        env = {
            **os.environ,
            "DELIVERY_DATABASE_URL": url,
            "DELIVERY_SECRET_KEY": "bench-notifications-key",
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
        server = psutil.Process(proc.pid)
        cpu_before = sum(server.cpu_times()[:2])
        figures = await _load(
            base_url, key, concurrency=args.concurrency, seconds=args.seconds, limit=args.limit
        )
        # Server CPU per request: unlike latency, barely moved by other load on the box.
        cpu_used = sum(server.cpu_times()[:2]) - cpu_before
        figures["cpu_ms"] = cpu_used * 1000 / max(figures["requests"], 1)
        figures["seed_s"] = seed_s
        return figures
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if pg_name:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        tmp.cleanup()


def main() -> None:
    """Parse arguments, run each database in turn, print one line of figures per database."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--limit", type=int, default=50, help="the list call's limit (1..500)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5k rows, 2 s")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.seconds = min(args.rows, 5_000), min(args.seconds, 2.0)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(
        f"notifications list: {args.rows} pending rows ({AGENTS} agents x {USERS} users), "
        f"{args.concurrency} concurrent clients, limit={args.limit}, {args.seconds:g} s each"
    )
    for kind in kinds:
        f = asyncio.run(_run_one(kind, args))
        print(
            f"{kind:9s} p50 {f['p50_ms']:7.1f} ms  p99 {f['p99_ms']:7.1f} ms  "
            f"max {f['max_ms']:7.1f} ms  {f['rps']:7.0f} req/s  "
            f"server CPU {f['cpu_ms']:.2f} ms/req  "
            f"({int(f['requests'])} requests, {int(f['errors'])} errors; seeded in "
            f"{f['seed_s']:.1f} s; load average {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
