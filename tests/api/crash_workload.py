"""
Idempotent creations interrupted by SIGKILL: the workload shared by the crash test and
``bench/bench_idempotency_crash.py``.

Each key creates one resource of one kind (schedule, wakeup, trigger event, inventory
item, contact) for a user named after the key, so the database tells how many times
each key's write happened. The server is a real ``delivery run`` (SQLite, its own
nats-server) or ``delivery web`` (PostgreSQL) process.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import column, func, select, table

from delivery.store.engine import create_engine

AGENT = "agent_crash"
KEY = "crash-test-key"
CADENCE = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
KINDS = ("schedule", "wakeup", "event", "item", "contact", "webhook")
#: Where each kind's row lands, and the column that names the key (``user-<key>``,
#: or ``evt-<key>`` for a webhook endpoint's event type).
TABLES = (
    ("schedules", "user_id", "user-"),
    ("wakeups", "user_id", "user-"),
    ("trigger_events", "user_id", "user-"),
    ("inventory_items", "user_id", "user-"),
    ("contacts", "user_id", "user-"),
    ("webhook_endpoints", "event_type", "evt-"),
)


def request_for(key: str, kinds: Sequence[str] = KINDS) -> tuple[str, str, dict[str, Any]]:
    """The (method, path, body) that ``key`` sends, every time it is sent."""
    kind = kinds[int(key.rsplit("-", 1)[1]) % len(kinds)]
    user = f"user-{key}"
    if kind == "schedule":
        return (
            "POST",
            f"/api/v1/agents/{AGENT}/users/{user}/schedules",
            {
                "cadence": CADENCE,
                "intent": "check in",
                "check_type": "reminder",
            },
        )
    if kind == "wakeup":
        body = {"user_id": user, "check_type": "check_in", "intent": "hi", "delay_hours": 1}
        return "POST", f"/api/v1/agents/{AGENT}/wakeups", body
    if kind == "event":
        body = {"user_id": user, "event_type": "crash_test", "event_description": "d"}
        return "POST", f"/api/v1/agents/{AGENT}/events", body
    if kind == "item":
        body = {"item_type": "medication", "label": key}
        return "POST", f"/api/v1/agents/{AGENT}/users/{user}/inventory/items", body
    if kind == "contact":
        body = {"kind": "email", "destination": f"{key}@example.com"}
        return "POST", f"/api/v1/agents/{AGENT}/users/{user}/contacts", body
    # Nothing listens there and nothing fires for this event type: registration only.
    return "PUT", f"/api/v1/webhooks/evt-{key}", {"webhook_url": "http://127.0.0.1:9/in"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A ``delivery`` process serving the API on ``port``; restartable on the same data."""

    command: str
    env: dict[str, str]
    log: Path
    port: int
    proc: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "delivery",
                self.command,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        return
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.command} did not come up; see {self.log}")
                await asyncio.sleep(0.1)

    async def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, open transactions die with the process."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()

    async def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)


def server_env(database_url: str, data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        DELIVERY_DATA_DIR=str(data_dir),
        DELIVERY_PORT=str(port),
        DELIVERY_BOOTSTRAP_API_KEY=KEY,
        DELIVERY_LOG_JSON="true",
        DELIVERY_WEBHOOK_ALLOW_NETS="127.0.0.0/8",
    )
    env["DELIVERY_DATABASE_URL"] = database_url
    if not database_url.startswith("sqlite"):
        env["DELIVERY_SECRET_KEY"] = "crash-test-key"
        env["DELIVERY_NATS_URL"] = os.environ.get("DELIVERY_NATS_URL", "nats://127.0.0.1:4222")
    return env


@contextlib.asynccontextmanager
async def server_for(database_url: str, tmp: Path) -> AsyncIterator[Server]:
    """``delivery run`` on an embedded SQLite data dir, ``delivery web`` on PostgreSQL."""
    data_dir = tmp / "data"
    data_dir.mkdir(exist_ok=True)
    port = free_port()
    command = "run" if database_url.startswith("sqlite") else "web"
    server = Server(command, server_env(database_url, data_dir, port), tmp / "server.log", port)
    try:
        yield server
    finally:
        await server.kill()


@dataclass
class Outcome:
    """What the workload saw."""

    keys: int
    answered_before_kill: dict[str, dict[str, Any]] = field(default_factory=dict)
    interrupted: int = 0
    retries: int = 0
    refusals: list[str] = field(default_factory=list)
    """What each retry that did not succeed was answered (status and code)."""
    replayed_after_restart: int = 0
    slowest_s: float = 0.0
    written: dict[str, int] = field(default_factory=dict)
    """Rows per key, over every kind's table."""


async def _send(client: httpx.AsyncClient, key: str, kinds: Sequence[str]) -> httpx.Response:
    method, path, body = request_for(key, kinds)
    return await client.request(method, path, json=body, headers={"Idempotency-Key": key})


async def run_workload(
    server: Server,
    database_url: str,
    *,
    keys: int,
    kill_after: int,
    concurrency: int = 16,
    kinds: Sequence[str] = KINDS,
) -> Outcome:
    """
    Send ``keys`` idempotent creations ``concurrency`` at a time, SIGKILL the server once
    ``kill_after`` have answered, restart it, retry every key until it answers 2xx, and
    count each key's rows.
    """
    names = [f"k-{n:05d}" for n in range(keys)]
    outcome = Outcome(keys=keys)
    await server.start()
    killed = asyncio.Event()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for name in names:
        queue.put_nowait(name)

    async def worker(client: httpx.AsyncClient) -> None:
        while not killed.is_set():
            try:
                name = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                answer = await _send(client, name, kinds)
            except httpx.TransportError:
                outcome.interrupted += 1
                continue
            if answer.is_success:
                outcome.answered_before_kill[name] = answer.json()
            if len(outcome.answered_before_kill) >= kill_after and not killed.is_set():
                killed.set()
                await server.kill()

    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    await server.kill()
    await server.start()

    async def retry(client: httpx.AsyncClient, name: str) -> None:
        started = time.monotonic()
        attempts = 0
        while True:
            attempts += 1
            answer = await _send(client, name, kinds)
            if answer.is_success:
                break
            outcome.refusals.append(f"{name}: {answer.status_code} {answer.text[:200]}")
            if time.monotonic() - started > 30:
                raise AssertionError(f"{name}: {answer.status_code} {answer.text}")
            await asyncio.sleep(0.05)
        outcome.retries += attempts - 1
        outcome.slowest_s = max(outcome.slowest_s, time.monotonic() - started)
        if answer.headers.get("idempotent-replayed") == "true":
            outcome.replayed_after_restart += 1
        first = outcome.answered_before_kill.get(name)
        if first is not None and answer.json() != first:
            raise AssertionError(f"{name}: replay {answer.json()} != first answer {first}")

    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=30) as client:
        sem = asyncio.Semaphore(concurrency)

        async def bounded(name: str) -> None:
            async with sem:
                await retry(client, name)

        await asyncio.gather(*(bounded(name) for name in names))
    await server.stop()

    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            for name, col, prefix in TABLES:
                named = column(col)
                rows = await conn.execute(
                    select(named, func.count())
                    .select_from(table(name, named))
                    .where(named.like(f"{prefix}k-%"))
                    .group_by(named)
                )
                for owner, count in rows:
                    key = owner.removeprefix(prefix)
                    outcome.written[key] = outcome.written.get(key, 0) + int(count)
    finally:
        await engine.dispose()
    return outcome
