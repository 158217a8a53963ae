"""
Webhook deliveries per second end to end, through the real worker, every attempt recorded.

``--count`` pending notifications (default 100,000) are seeded for users of ``--projects``
projects, each with an endpoint registered for the notifications' event type (a sealed
signing secret, as the API stores it). Then one :class:`WebhookWorker` runs its own loop
(no NATS: the consumer's part is fed in-process through ``worker.enqueue`` in pull-sized
batches, as ``handle_batch`` would), claiming, signing, POSTing to a local aiohttp
receiver in a separate process, and recording each attempt with the delivery's next state.

The clock starts with the first enqueue and stops when the last delivery is settled. Then
the database is checked: every notification delivered exactly once (one ``delivered``
delivery and one ``success`` attempt each, the notification ``consumed``) and the
receiver's count of POSTs equals the number of attempts recorded.

    .venv/bin/python bench/bench_webhooks_e2e.py                   # 100,000, SQLite
    .venv/bin/python bench/bench_webhooks_e2e.py --count 20000     # shorter
    .venv/bin/python bench/bench_webhooks_e2e.py --origin-per-project  # 127.0.0.1 ... .8
    .venv/bin/python bench/bench_webhooks_e2e.py --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/bench_webhooks

A PostgreSQL database named by ``--database-url`` is dropped and created afresh.

Target: >= 2,000 deliveries/s (the sender alone reaches about 2,600/s at 256 in flight,
``bench/bench_webhooks.py``).
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from delivery.clock import SystemClock  # noqa: E402 - after the sys.path fix-up
from delivery.logs import configure_logging  # noqa: E402
from delivery.secrets import SecretBox  # noqa: E402
from delivery.settings import Settings  # noqa: E402
from delivery.startup import run_main  # noqa: E402
from delivery.store.bulk import insert_notifications  # noqa: E402
from delivery.store.engine import create_engine  # noqa: E402
from delivery.store.migrate import migrate  # noqa: E402
from delivery.store.sql import SqlStore  # noqa: E402
from delivery.store.tables import DELIVERIES, NOTIFICATIONS  # noqa: E402
from delivery.store.webhooks import (  # noqa: E402
    ATTEMPTS,
    NewNotification,
    WebhookStore,
)
from handlers.webhooks.signing import generate_secret  # noqa: E402
from handlers.webhooks.worker import BATCH, WebhookWorker  # noqa: E402

TARGET_RATE = 2000.0
EVENT = "on_wakeup_ready"
USERS_PER_PROJECT = 5


def serve_forever(hosts: int) -> None:
    """
    The receiver process: count POSTs and answer 200 as cheaply as aiohttp allows, on
    127.0.0.1 and on 127.0.0.2 ... up to ``hosts`` loopback addresses, one port.
    """
    from aiohttp import web

    count = 0

    async def ok(request: web.Request) -> web.Response:
        nonlocal count
        await request.read()
        count += 1
        return web.Response(text='{"success":true}', content_type="application/json")

    async def seen(_request: web.Request) -> web.Response:
        return web.Response(text=str(count))

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/count", seen)
        app.router.add_post("/{tail:.*}", ok)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        for n in range(2, hosts + 1):
            await web.TCPSite(runner, f"127.0.0.{n}", port, backlog=4096).start()
        print(port, flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def _rows(project: str, start: int, count: int, at: datetime) -> list[dict[str, Any]]:
    rows = []
    for n in range(start, start + count):
        nid = f"msg_{project[-6:]}_{n:08d}"
        user = f"user-{n % USERS_PER_PROJECT}"
        payload = {
            "event_id": nid,
            "event_type": EVENT,
            "created_at": at.isoformat(),
            "project_id": project,
            "agent_id": "agent-bench",
            "user_id": user,
            "message_id": nid,
            "source_type": "wakeup",
            "wakeup_id": f"wk_{n}",
            "check_type": "reminder",
            "intent": "check in",
            "generated_message": "Good morning! A quick check-in: how are you feeling today?",
            "fire_at": at.isoformat(),
            "fire_at_local": at.isoformat(),
            "metadata": {},
        }
        rows.append(
            {
                "id": nid,
                "project_id": project,
                "agent_id": "agent-bench",
                "user_id": user,
                "source_type": "wakeup",
                "source_id": f"wk_{project[-6:]}_{n:08d}",
                "schedule_id": None,
                "wakeup_id": f"wk_{n}",
                "trigger_event_id": None,
                "event_type": EVENT,
                "check_type": "reminder",
                "intent": "check in",
                "generated_message": payload["generated_message"],
                "status": "pending",
                "error": None,
                "fire_at": at,
                "payload_json": json.dumps(payload, sort_keys=True, separators=(",", ":")),
                "ack_status": "pending",
                "acknowledged_at": None,
                "created_at": at,
                "consumed_at": None,
            }
        )
    return rows


async def _fresh_postgres(url: str) -> None:
    parsed = make_url(url)
    admin = create_async_engine(
        parsed.set(database="postgres").render_as_string(hide_password=False),
        isolation_level="AUTOCOMMIT",
    )
    async with admin.connect() as conn:
        await conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}"'))
        await conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    await admin.dispose()


async def _run(args: argparse.Namespace, folder: Path, port: str) -> None:
    url = args.database_url or f"sqlite+aiosqlite:///{folder / 'delivery.db'}"
    if not url.startswith("sqlite"):
        await _fresh_postgres(url)
    await migrate(url)
    engine = create_engine(url)
    settings = Settings(
        data_dir=folder,
        secret_key=SecretStr("bench-webhooks-e2e"),
        webhook_allow_nets="127.0.0.0/8",
        webhook_max_in_flight=args.in_flight,
    )
    clock = SystemClock()
    box = SecretBox.from_settings(settings)
    store = SqlStore(engine)
    webhooks = WebhookStore(engine)
    now = clock.now()
    projects: list[str] = []
    for p in range(args.projects):
        project = (await store.keys.ensure_project(f"bench-{p}", now)).id
        host = f"127.0.0.{p + 1}" if args.origin_per_project else "127.0.0.1"
        await webhooks.upsert_endpoint(
            project,
            EVENT,
            url=f"http://{host}:{port}/webhooks/sonzai",
            auth_header_enc=None,
            new_secret_enc=box.seal(generate_secret()),
            now=now,
        )
        projects.append(project)
    seeded: list[NewNotification] = []
    per_project = -(-args.count // args.projects)
    at = now - timedelta(seconds=1)
    left = args.count
    for project in projects:
        take = min(per_project, left)
        left -= take
        for start in range(0, take, 5000):
            rows = _rows(project, start, min(5000, take - start), at)
            async with engine.begin() as conn:
                await insert_notifications(conn, rows)
            seeded += [NewNotification(str(r["id"]), project, EVENT) for r in rows]
    # Interleave the projects, as notifications for several projects arrive on one stream.
    seeded.sort(key=lambda n: n.notification_id[-8:])
    print(f"seeded {len(seeded):,} notifications for {len(projects)} projects", flush=True)

    settled = 0
    done = asyncio.Event()

    def finished(_claimed: object, _outcome: str) -> None:
        nonlocal settled
        settled += 1
        if settled >= len(seeded):
            done.set()

    worker = WebhookWorker(
        settings,
        engine,
        clock=clock,
        box=box,
        poll_interval=timedelta(seconds=0.5),
        on_finished=finished,
    )
    await worker.start()
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        # The consumer's part: pull-sized batches, one after another, as one subscriber.
        for i in range(0, len(seeded), BATCH):
            await worker.enqueue(seeded[i : i + BATCH])
        enqueued = time.perf_counter() - started
        await asyncio.wait_for(done.wait(), timeout=args.timeout)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        await worker.stop()

    d, n, a = DELIVERIES.c, NOTIFICATIONS.c, ATTEMPTS.c
    async with engine.connect() as conn:
        by_status = dict(
            (await conn.execute(select(d.status, func.count()).group_by(d.status))).all()
        )
        attempts = dict(
            (await conn.execute(select(a.status, func.count()).group_by(a.status))).all()
        )
        per_delivery = (
            await conn.execute(
                select(func.count()).select_from(
                    select(a.delivery_id)
                    .group_by(a.delivery_id)
                    .having(func.count() > 1)
                    .subquery()
                )
            )
        ).scalar_one()
        consumed = (
            await conn.execute(select(func.count()).where(n.status == "consumed"))
        ).scalar_one()
    await engine.dispose()
    async with httpx.AsyncClient() as client:
        posts = int((await client.get(f"http://127.0.0.1:{port}/count")).text)

    total_attempts = sum(attempts.values())
    problems = []
    if by_status != {"delivered": len(seeded)}:
        problems.append(f"deliveries by status {by_status}")
    if attempts.get("success", 0) != len(seeded) or per_delivery:
        problems.append(f"attempts by status {attempts}, {per_delivery} deliveries with >1")
    if consumed != len(seeded):
        problems.append(f"{consumed} notifications consumed")
    if posts != total_attempts:
        problems.append(f"receiver saw {posts} POSTs for {total_attempts} attempts recorded")
    rate = len(seeded) / elapsed
    kind = "SQLite" if url.startswith("sqlite") else "PostgreSQL"
    print(
        f"webhooks end to end: {rate:,.0f} deliveries/s over {len(seeded):,} notifications "
        f"({len(projects)} projects, one endpoint each, "
        f"{'one origin each' if args.origin_per_project else 'all on one origin'}, "
        f"{args.in_flight} in flight), "
        f"{elapsed:.2f} s ({enqueued:.2f} s to enqueue), {kind}, "
        f"{type(asyncio.get_running_loop()).__module__.split('.')[0]} loop; "
        f"attempts recorded {total_attempts:,}, receiver POSTs {posts:,}; "
        f"target {TARGET_RATE:,.0f}/s, ratio {rate / TARGET_RATE:.2f}"
    )
    # CPU per delivery holds still when other work shares the cores; the rate does not.
    print(
        f"worker process CPU: {1000 * cpu / len(seeded):.3f} ms per delivery "
        f"(one free core would do {len(seeded) / cpu:,.0f}/s)"
    )
    print("load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if problems:
        raise SystemExit("NOT exactly once: " + "; ".join(problems))


def main() -> None:
    """Start the receiver, run, print the figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--projects", type=int, default=8, help="one endpoint each")
    parser.add_argument("--in-flight", type=int, default=256, help="DELIVERY_WEBHOOK_MAX_IN_FLIGHT")
    parser.add_argument("--database-url", default=None, help="PostgreSQL (dropped, recreated)")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument(
        "--origin-per-project",
        action="store_true",
        help="each project's endpoint on its own loopback address (127.0.0.N), as tenants' "
        "receivers are; by default all share one origin, so DELIVERY_WEBHOOK_PER_ENDPOINT "
        "(32) bounds the whole run's concurrency",
    )
    parser.add_argument(
        "--asyncio-loop",
        action="store_true",
        help="run the worker on asyncio's own loop; by default it runs on the loop the "
        "service's long-running commands run on (delivery.startup.run_main: uvloop)",
    )
    args = parser.parse_args()
    if args.serve:
        serve_forever(args.projects if args.origin_per_project else 1)
        return
    configure_logging("WARNING")
    serve = [sys.executable, os.path.abspath(__file__), "--serve", "--projects", str(args.projects)]
    if args.origin_per_project:
        serve.append("--origin-per-project")
    receiver = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        port = receiver.stdout.readline().strip()
        if not port.isdigit():
            raise SystemExit(f"receiver did not start: {port!r}")
        with tempfile.TemporaryDirectory() as name:
            if args.asyncio_loop:
                asyncio.run(_run(args, Path(name), port))
            else:
                run_main(partial(_run, args, Path(name), port), debug=True)
    finally:
        receiver.kill()
        receiver.wait()


if __name__ == "__main__":
    main()
