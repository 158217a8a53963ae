"""
The production shape, run for real, with chaos while work is in flight.

A 3-node NATS JetStream cluster (deploy/'s configs), a fresh PostgreSQL database,
2 ``web``, 3 ``scheduler``, 2 ``dispatcher`` and 2 ``handlers`` processes, the stream
replicated three times. Schedules fire, wakeups and trigger events are posted through
both web processes, and a local receiver takes every webhook. Meanwhile: a scheduler,
a dispatcher and a handlers process are SIGKILLed (and restarted), the stream's
leader node is killed and brought back, and every PostgreSQL backend of the database
is terminated. Then every accepted source must have exactly one notification, and
every notification must have reached the receiver and be consumed.

``DELIVERY_CLUSTER_TOTAL`` sets the number of sources (20,000 by default: half
schedules, a quarter wakeups, a quarter trigger events).
"""

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import nats
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from delivery.bus.subjects import Subjects
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore
from delivery.store.tables import NOTIFICATIONS
from tests.cluster.harness import NatsCluster, Part, free_port
from tests.daemon.helpers import add_project, add_schedules, due_daily_rows
from tests.fixtures.http import serve

TOTAL = int(os.environ.get("DELIVERY_CLUSTER_TOTAL", "20000"))
SHAPE = {"web": 2, "scheduler": 3, "dispatcher": 2, "handlers": 2}
"""Processes per part; deploy/compose.yaml runs the same parts (test_compose_matches)."""
SHARED_ENV = ("DELIVERY_DATABASE_URL", "DELIVERY_NATS_URL", "DELIVERY_SECRET_KEY")
"""What every part of the shape is given alike (besides test tuning)."""
SECRET = "cluster-test-secret-key"
EVENT_TYPES = ("on_recurring_event_due", "on_wakeup_ready", "on_trigger_event")


class Receiver:
    """Counts webhook bodies by message id (uvicorn's thread writes, the test reads)."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    async def hook(self, request: Request) -> Response:
        body = json.loads(await request.body())
        with self._lock:
            self.seen[body["message_id"]] += 1
        return Response(status_code=204)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])


async def _terminate_backends(database_url: str) -> int:
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database="postgres"
    )
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            url.database,
        )
        return len(rows)
    finally:
        await conn.close()


async def _stream_leader(nats_url: str, subjects: Subjects) -> str:
    nc = await nats.connect(nats_url.split(","))
    try:
        info = await nc.jetstream().stream_info(subjects.stream)
        assert info.cluster is not None
        assert info.config.num_replicas == 3
        assert info.cluster.leader is not None
        return info.cluster.leader
    finally:
        await nc.close()


async def _post_all(webs: list[Part], key: str, count: int) -> int:
    """``count`` wakeups and trigger events, alternating, spread over the web parts."""
    accepted = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def worker(n: int) -> None:
        nonlocal accepted
        web = webs[n % len(webs)]
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": ""}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{web.port}", timeout=30) as client:
            while not queue.empty():
                i = queue.get_nowait()
                headers["Idempotency-Key"] = f"src-{i}"
                if i % 2:
                    path = "/api/v1/agents/agent_1/wakeups"
                    body = {"user_id": f"u{i}", "check_type": "c", "intent": "hi", "delay_hours": 0}
                else:
                    path = "/api/v1/agents/agent_1/events"
                    body = {"user_id": f"u{i}", "event_type": "e", "event_description": "d"}
                # A retry with the same key is safe: the API replays the first answer.
                for _ in range(20):
                    try:
                        answer = await client.post(path, json=body, headers=headers)
                    except httpx.HTTPError:
                        await asyncio.sleep(0.5)
                        continue
                    if answer.status_code < 500:
                        break
                    await asyncio.sleep(0.5)
                assert answer.status_code in (200, 201), answer.text
                accepted += 1

    await asyncio.gather(*(worker(n) for n in range(24)))
    return accepted


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hooks = Receiver()
    with serve(hooks.app()) as base_url:
        yield hooks, f"{base_url}/hook"


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_every_source_once_through_chaos(
    database_url: str, tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    hooks, hook_url = receiver
    started = time.monotonic()
    cluster = NatsCluster(tmp_path / "nats")
    nats_url = await asyncio.to_thread(cluster.start)
    prefix = f"c{os.getpid()}{int(started)}"
    subjects = Subjects(prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        DELIVERY_DATABASE_URL=database_url,
        DELIVERY_NATS_URL=nats_url,
        DELIVERY_SUBJECT_PREFIX=prefix,
        DELIVERY_SECRET_KEY=SECRET,
        DELIVERY_LOG_LEVEL="WARNING",
        DELIVERY_LOG_JSON="true",
        DELIVERY_LEASE_S="10",
        DELIVERY_WEBHOOK_TIMEOUT_S="5",
        DELIVERY_WEBHOOK_ALLOW_NETS="127.0.0.0/8",
        DELIVERY_DATA_DIR=str(tmp_path / "data"),
    )
    await migrate(database_url)
    engine = create_engine(database_url)
    parts: list[Part] = []
    try:
        store = SqlStore(engine)
        await add_project(engine)
        key = await store.keys.create_api_key("prj_test", datetime.now(UTC))
        schedules = TOTAL // 2
        due = (datetime.now(UTC) + timedelta(seconds=75)).replace(second=0, microsecond=0)
        await add_schedules(engine, due_daily_rows(schedules, due, due - timedelta(days=1)))

        def part(command: str, n: int, **extra: str) -> Part:
            log = tmp_path / f"{command}-{n}.log"
            return Part(
                command, {**env, **extra}, log, port=int(extra.get("DELIVERY_PORT", 0)) or None
            )

        webs = [part("web", n, DELIVERY_PORT=str(free_port())) for n in range(SHAPE["web"])]
        schedulers = [part("scheduler", n) for n in range(SHAPE["scheduler"])]
        dispatchers = [part("dispatcher", n) for n in range(SHAPE["dispatcher"])]
        handlers = [part("handlers", n) for n in range(SHAPE["handlers"])]
        assert all(name in env for name in SHARED_ENV)
        parts = [*webs, *schedulers, *dispatchers, *handlers]
        for p in parts:
            await p.start()
        for web in webs:
            await web.wait_healthy()
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{webs[0].port}",
            headers={"Authorization": f"Bearer {key}"},
        ) as client:
            for event_type in EVENT_TYPES:
                answer = await client.put(
                    f"/api/v1/webhooks/{event_type}", json={"webhook_url": hook_url}
                )
                assert answer.status_code == 200, answer.text

        posting = asyncio.create_task(_post_all(webs, key, TOTAL - schedules))
        chaos: list[str] = []

        async def restart_after(p: Part, delay: float) -> None:
            await asyncio.sleep(delay)
            await p.start()

        # The chaos lands around the schedules' minute, while posts are in flight.
        await asyncio.sleep(max(0.0, (due - datetime.now(UTC)).total_seconds() - 3))
        await schedulers[0].kill()
        chaos.append("scheduler SIGKILL")
        restarts = [asyncio.create_task(restart_after(schedulers[0], 3))]
        await asyncio.sleep(2)
        await dispatchers[0].kill()
        chaos.append("dispatcher SIGKILL")
        restarts.append(asyncio.create_task(restart_after(dispatchers[0], 3)))
        leader = await _stream_leader(nats_url, subjects)
        cluster.nodes[leader].kill()
        chaos.append(f"NATS stream leader {leader} SIGKILL")
        await asyncio.sleep(2)
        terminated = await _terminate_backends(database_url)
        chaos.append(f"pg_terminate_backend x{terminated}")
        await asyncio.sleep(2)
        await handlers[0].kill()
        chaos.append("handlers SIGKILL")
        restarts.append(asyncio.create_task(restart_after(handlers[0], 3)))
        await asyncio.sleep(3)
        cluster.nodes[leader].start(tmp_path / "nats" / f"{leader}.log")
        chaos.append(f"{leader} back")
        await asyncio.gather(*restarts)
        accepted = await asyncio.wait_for(posting, 600)
        expected = schedules + accepted

        async def settled() -> tuple[int, int, int]:
            async with engine.connect() as conn:
                made = (
                    await conn.execute(select(func.count()).select_from(NOTIFICATIONS))
                ).scalar_one()
                consumed = (
                    await conn.execute(
                        select(func.count())
                        .select_from(NOTIFICATIONS)
                        .where(NOTIFICATIONS.c.status == "consumed")
                    )
                ).scalar_one()
            return int(made), int(consumed), len(hooks.seen)

        deadline = time.monotonic() + 900
        state = await settled()
        while state != (expected, expected, expected) and time.monotonic() < deadline:
            await asyncio.sleep(2)
            state = await settled()
        async with engine.connect() as conn:
            sources = (
                await conn.execute(select(func.count(func.distinct(NOTIFICATIONS.c.source_id))))
            ).scalar_one()
            ids = set((await conn.execute(select(NOTIFICATIONS.c.id))).scalars())
        report = {
            "sources": expected,
            "notifications": state[0],
            "distinct sources": sources,
            "consumed": state[1],
            "delivered ids": state[2],
            "deliveries (with retries)": sum(hooks.seen.values()),
            "chaos": chaos,
            "seconds": round(time.monotonic() - started, 1),
        }
        print(json.dumps(report))  # noqa: T201 - the figures for the closing note
        assert state == (expected, expected, expected), report
        assert sources == expected, report
        assert set(hooks.seen) == ids, report
    finally:
        for p in parts:
            await p.stop()
        await engine.dispose()
        await asyncio.to_thread(cluster.stop)
