"""
Console page latency (p50 / p99 per page) for a project with 10,000 schedules and a
user with 10,000 timeline events, on SQLite and on PostgreSQL; ``delivery web`` serves
the console in its own process. Target: every page's p99 <= 100 ms.

The user's history is the timeline benchmark's (``bench_timeline._story``: fires and
skips, messages, webhook and channel attempts, wakeups, trigger events); 9,999 more
schedules belong to 1,000 other users of the same agent, and the project has a webhook
endpoint (auth header sealed) whose 2,000 attempts the webhook pages read. Each page is
asked ``--requests`` times, one client, signed in with a session cookie as a browser
is; the time is the client's on loopback (the server's plus a loopback round trip, so
an upper bound on server time). The floor is the API's notifications list (one indexed
range read) on the same server.

    .venv/bin/python bench/bench_console.py              # 300 requests per page, both databases
    .venv/bin/python bench/bench_console.py --quick      # smoke: 50 per page
    .venv/bin/python bench/bench_console.py --db sqlite --requests 1000
"""

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from bench_timeline import (
    AGENT,
    PG_ADMIN_URL,
    START,
    USER,
    _free_port,
    _pg_admin,
    _story,
    _wait_ready,
)
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore
from delivery.store.tables import ENDPOINTS, SCHEDULES

TARGET_P99_MS = 100.0
SECRET = "bench-console-key"  # noqa: S105 - the benchmark's throwaway at-rest key
EVENT = "on_recurring_event_due"
OTHER_USERS = 1000
PER_USER = 10


def _schedules(project: str) -> list[dict[str, Any]]:
    """9,999 schedules of other users: with the user's own, 10,000 in the project."""
    return [
        {
            "id": f"sch_other_{n:06d}",
            "project_id": project,
            "agent_id": AGENT,
            "user_id": f"other-{n // PER_USER:04d}",
            "cadence_type": "simple",
            "cadence_json": '{"simple":{"frequency":"daily","times":["09:00"]}}',
            "timezone": "America/New_York",
            "active_window_json": None,
            "intent": "check in",
            "check_type": f"routine_{n % PER_USER}",
            "anchor_at": START,
            "next_fire_at": START + timedelta(days=1, minutes=n % 600),
            "version": 1,
            "created_at": START,
            "updated_at": START,
        }
        for n in range(OTHER_USERS * PER_USER - 1)
    ]


async def _seed(url: str) -> str:
    """Migrate and write the project; returns its API key."""
    await migrate(url)
    engine = create_engine(url)
    box = SecretBox.from_settings(Settings(secret_key=SecretStr(SECRET)))
    try:
        store = SqlStore(engine)
        project = await store.keys.ensure_project("bench", START)
        key = await store.keys.create_api_key(project.id, START)
        async with engine.begin() as conn:
            for table, rows in _story(project.id, USER, "u").items():
                for i in range(0, len(rows), 2000):
                    await conn.execute(table.insert(), rows[i : i + 2000])
            others = _schedules(project.id)
            for i in range(0, len(others), 2000):
                await conn.execute(SCHEDULES.insert(), others[i : i + 2000])
            await conn.execute(
                ENDPOINTS.insert(),
                [
                    {
                        "id": "whk_bench",
                        "project_id": project.id,
                        "event_type": EVENT,
                        "url": "https://hooks.example.com/delivery",
                        "secret_enc": box.seal("whsec_benchbenchbench"),
                        "auth_header_enc": box.seal("Bearer receiver-token"),
                        "is_active": True,
                        "created_at": START,
                        "updated_at": START,
                    }
                ],
            )
        if url.startswith("postgresql"):
            async with engine.connect() as conn:
                await conn.exec_driver_sql("ANALYZE")
                await conn.commit()
        return key
    finally:
        await engine.dispose()


async def _sign_in(session: aiohttp.ClientSession, base: str, key: str) -> str:
    """The session cookie header a browser would send after signing in."""
    async with session.get(f"{base}/console/sign-in") as r:
        page = await r.text()
        pre = r.cookies["delivery_console_signin"].value
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    async with session.post(
        f"{base}/console/sign-in",
        data={"csrf": found.group(1), "api_key": key, "next": "/console/users"},
        headers={"Cookie": f"delivery_console_signin={pre}"},
        allow_redirects=False,
    ) as r:
        assert r.status == 303, await r.text()
        return f"delivery_console={r.cookies['delivery_console'].value}"


PAGES = {
    "users search": ("/console/users?agent=agent-&user=other-", b"other-0000"),
    "user": (f"/console/users/{AGENT}/{USER}", b"fire.skipped"),
    "user + explain": (
        f"/console/users/{AGENT}/{USER}?at=2026-02-01T10:30:00Z&window=1h",
        b'class="answer',
    ),
    "user, older page": ("", b"Timeline"),  # the cursor is read from the user page
    "schedule": (f"/console/users/{AGENT}/{USER}/schedules/sch_u", b"next-fire-at"),
    "webhooks": ("/console/webhooks", b"Bearer ****"),
    "webhook attempts": (f"/console/webhooks/{EVENT}", b"Resend"),
    "health": ("/console/health", b"Fires in the last hour"),
}


async def _measure(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], expect: bytes, n: int
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    for i in range(n + 20):
        started = time.perf_counter()
        async with session.get(url, headers=headers, allow_redirects=False) as r:
            body = await r.read()
            ok = r.status == 200 and expect in body
        if i >= 20:  # warm-up excluded
            latencies.append(time.perf_counter() - started)
            errors += not ok
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[max(int(len(latencies) * 0.99) - 1, 0)] * 1000,
        "errors": errors,
    }


async def _run_one(kind: str, requests: int) -> dict[str, dict[str, float]]:
    tmp = tempfile.TemporaryDirectory(prefix="dlv-bench-console-")
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
            "DELIVERY_SECRET_KEY": SECRET,
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
        base = f"http://127.0.0.1:{port}"
        await _wait_ready(base, proc)
        results: dict[str, dict[str, float]] = {}
        async with aiohttp.ClientSession() as session:
            cookie = {"Cookie": await _sign_in(session, base, key)}
            async with session.get(base + PAGES["user"][0], headers=cookie) as r:
                older = re.search(r'\?cursor=([^"]+)">Older', await r.text())
            assert older is not None, "the user page has no older page"
            for name, (path, expect) in PAGES.items():
                if name == "user, older page":
                    path = f"{PAGES['user'][0]}?cursor={older.group(1)}"
                results[name] = await _measure(session, base + path, cookie, expect, requests)
            floor_headers = {"Authorization": f"Bearer {key}"}
            results["floor: notifications list"] = await _measure(
                session,
                f"{base}/api/v1/agents/{AGENT}/notifications?user_id={USER}&limit=50",
                floor_headers,
                b"message_id",
                requests,
            )
        return results
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if pg_name:
            await _pg_admin(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        tmp.cleanup()


def main() -> None:
    """Parse arguments, run each database in turn, print each page's figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 requests a page")
    args = parser.parse_args()
    if args.quick:
        args.requests = min(args.requests, 50)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    print(
        f"console pages: 10,000 schedules in the project, 10,000 timeline events for the "
        f"user, {args.requests} requests a page, one client, signed in; floor: the API's "
        f"notifications list; target p99 <= {TARGET_P99_MS:g} ms per page"
    )
    for kind in kinds:
        results = asyncio.run(_run_one(kind, args.requests))
        floor = results["floor: notifications list"]["p99_ms"]
        worst = max(v["p99_ms"] for k, v in results.items() if not k.startswith("floor"))
        for name, r in results.items():
            print(
                f"{kind:9s} {name:26s} p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                f"ratio p99 to floor {r['p99_ms'] / floor:4.1f}x  ({int(r['errors'])} errors)"
            )
        verdict = "meets" if worst <= TARGET_P99_MS else "MISSES"
        print(
            f"{kind:9s} worst page p99 {worst:.1f} ms: {verdict} the target "
            f"(load average {os.getloadavg()[0]:.1f})"
        )


if __name__ == "__main__":
    main()
