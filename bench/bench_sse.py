"""
The live stream under load: concurrent connected SSE clients held open, the server's
RSS per client, and how long a new notification takes to reach every client.

The API (uvicorn, SQLite in a temporary folder, ``routes/stream.py``) runs in its own
process so its RSS is measured alone; the clients are raw asyncio sockets in this
process (one ``GET .../notifications/stream`` each, one user per client). After every
client has its ``: connected`` line, one notification per user is inserted and its
``notification.created`` published on core NATS, as the outbox relay does; the figure
is the time from publish to the event arriving at its client.

    .venv/bin/python bench/bench_sse.py            # 1000 clients
    .venv/bin/python bench/bench_sse.py --quick    # 200 clients, a few seconds

NATS: ``DELIVERY_NATS_URL`` or ``nats://127.0.0.1:4222``.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import nats
import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from delivery.bus.messages import NotificationCreated  # noqa: E402
from delivery.bus.subjects import Subjects  # noqa: E402
from delivery.store.bulk import insert_notifications  # noqa: E402
from delivery.store.engine import create_engine  # noqa: E402
from delivery.store.migrate import migrate  # noqa: E402
from delivery.store.sql import SqlStore  # noqa: E402

AGENT = "bench-agent"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(db_url: str, port: int, nats_url: str, prefix: str) -> None:
    """Child process: the API on ``port`` with a 15 s heartbeat (the production default)."""
    import uvicorn

    from delivery.api import create_app
    from delivery.clock import SystemClock
    from delivery.logs import configure_logging
    from delivery.settings import Settings

    configure_logging("WARNING", json=True)

    async def main() -> None:
        engine = create_engine(db_url)
        try:
            settings = Settings(nats_url=nats_url, subject_prefix=prefix)
            app = create_app(settings, SqlStore(engine), SystemClock())
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                access_log=False,
                ws="none",
                lifespan="off",
                backlog=4096,
                timeout_graceful_shutdown=1,
            )
            await uvicorn.Server(config).serve()
        finally:
            await engine.dispose()

    asyncio.run(main())


async def _prepare(db_url: str) -> tuple[str, str]:
    await migrate(db_url)
    engine = create_engine(db_url)
    try:
        store = SqlStore(engine)
        now = datetime.now(UTC)
        project = await store.keys.ensure_project("bench", now)
        return project.id, await store.keys.create_api_key(project.id, now)
    finally:
        await engine.dispose()


class Client:
    """One SSE connection over a raw socket; records when each event id arrived."""

    def __init__(self, port: int, key: str, user: str) -> None:
        self.port = port
        self.key = key
        self.user = user
        self.connected = asyncio.Event()
        self.arrived: dict[str, float] = {}
        self.got_one = asyncio.Event()
        self.heartbeats = 0
        self._writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 16)
        self._writer = writer
        writer.write(
            (
                f"GET /api/v1/agents/{AGENT}/users/{self.user}/notifications/stream HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nAuthorization: Bearer {self.key}\r\n"
                "Accept: text/event-stream\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        event_id = ""
        while line := await reader.readline():
            text = line.decode().rstrip("\r\n")
            if text.startswith(": connected"):
                self.connected.set()
            elif text.startswith(": heartbeat"):
                self.heartbeats += 1
            elif text.startswith("id: "):
                event_id = text[4:]
            elif text.startswith("data: ") and event_id:
                self.arrived[event_id] = time.perf_counter()
                self.got_one.set()
                event_id = ""

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def bench(clients: int, nats_url: str) -> dict[str, float]:
    """Run one measurement; return the figures."""
    folder = Path(tempfile.mkdtemp(prefix="bench_sse_"))
    db_url = f"sqlite+aiosqlite:///{folder / 'delivery.db'}"
    project, key = await _prepare(db_url)
    prefix = f"bsse{uuid.uuid4().hex[:8]}"
    port = _free_port()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        db_url,
        str(port),
        nats_url,
        prefix,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    nc = await nats.connect(nats_url)
    engine = create_engine(db_url)
    tasks: list[asyncio.Task[None]] = []
    everyone: list[Client] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                if time.monotonic() > deadline or child.returncode is not None:
                    raise RuntimeError("the API process did not start") from None
                await asyncio.sleep(0.1)
        # Warm up: one client loads the route's code and opens the hub's NATS connection.
        warm = Client(port, key, "warm-up")
        everyone.append(warm)
        tasks.append(asyncio.create_task(warm.run()))
        await asyncio.wait_for(warm.connected.wait(), 30)
        await asyncio.sleep(0.5)
        rss_before = _rss(child.pid)

        pool = [Client(port, key, f"user-{i}") for i in range(clients)]
        everyone.extend(pool)
        started = time.perf_counter()
        for i in range(0, clients, 100):
            batch = pool[i : i + 100]
            tasks.extend(asyncio.create_task(c.run()) for c in batch)
            await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in batch)), 60)
        connect_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        rss_after = _rss(child.pid)

        now = datetime.now(UTC)
        rows = [
            {
                "id": f"msg_bench_{i}",
                "project_id": project,
                "agent_id": AGENT,
                "user_id": c.user,
                "source_type": "event",
                "source_id": f"evt_bench_{i}",
                "schedule_id": None,
                "wakeup_id": None,
                "trigger_event_id": f"evt_bench_{i}",
                "event_type": "on_trigger_event",
                "check_type": "bench",
                "intent": "",
                "generated_message": f"hello {i}",
                "status": "pending",
                "error": None,
                "fire_at": now,
                "payload_json": "{}",
                "ack_status": "pending",
                "acknowledged_at": None,
                "created_at": now,
                "consumed_at": None,
            }
            for i, c in enumerate(pool)
        ]
        async with engine.begin() as conn:
            await insert_notifications(conn, rows)
        subjects = Subjects(prefix)
        sent_at: dict[str, float] = {}
        for i, c in enumerate(pool):
            created = NotificationCreated(
                notification_id=f"msg_bench_{i}",
                project_id=project,
                agent_id=AGENT,
                user_id=c.user,
                event_type="on_trigger_event",
            )
            sent_at[created.notification_id] = time.perf_counter()
            await nc.publish(subjects.notification_created, created.model_dump_json().encode())
        await nc.flush()
        await asyncio.wait_for(asyncio.gather(*(c.got_one.wait() for c in pool)), 60)
        latencies = sorted(
            (c.arrived[f"msg_bench_{i}"] - sent_at[f"msg_bench_{i}"]) * 1000
            for i, c in enumerate(pool)
        )
        return {
            "clients": clients,
            "connect_s": connect_s,
            "rss_before_mib": rss_before / 2**20,
            "rss_after_mib": rss_after / 2**20,
            "rss_per_client_kib": (rss_after - rss_before) / clients / 1024,
            "latency_p50_ms": statistics.median(latencies),
            "latency_p99_ms": latencies[int(0.99 * (len(latencies) - 1))],
            "latency_max_ms": latencies[-1],
        }
    finally:
        # Hang up first, so the server sees every client leave before it is stopped.
        for client in everyone:
            client.close()
        await asyncio.sleep(0.5)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        child.terminate()
        await asyncio.wait_for(child.wait(), 10)
        await engine.dispose()
        await nc.close()


def main() -> None:
    """Parse arguments, run, print the figures."""
    if len(sys.argv) == 6 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 clients")
    args = parser.parse_args()
    clients = 200 if args.quick else args.clients
    nats_url = os.environ.get("DELIVERY_NATS_URL", "nats://127.0.0.1:4222")
    figures = asyncio.run(bench(clients, nats_url))
    print(
        f"SSE: {figures['clients']:.0f} clients connected in {figures['connect_s']:.2f} s; "
        f"server RSS {figures['rss_before_mib']:.1f} -> {figures['rss_after_mib']:.1f} MiB "
        f"= {figures['rss_per_client_kib']:.1f} KiB per client; "
        f"publish -> event p50 {figures['latency_p50_ms']:.1f} ms, "
        f"p99 {figures['latency_p99_ms']:.1f} ms, max {figures['latency_max_ms']:.1f} ms"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
