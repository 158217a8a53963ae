"""
Crash with trigger events handed off in-process: clients POST a storm of events to
``delivery run``, which hands the accepted ones from its API to its dispatcher in
memory (their ``event.accepted`` rows held, unsent); SIGKILL it mid-storm, restart
it, and check that every event answered 200 is recorded, that every recorded event
has exactly one notification carrying its request's id, and that every event row
ends sent.

A request cut off by the kill may have committed without its answer reaching the
client (as without the hand-off): such an event is recorded and gets its one
notification; there are at most as many as requests were in flight.
"""

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.tables import EVENTS
from tests.daemon.helpers import (
    NOTIFICATIONS,
    OUTBOX,
    assert_one_notification_each,
    assert_stamped_have_notifications,
    count,
    crash_database,
    daemon_env,
    drop_crash_database,
    outbox_rows_per_message,
    reap_daemon,
    rows,
    start_daemon,
    stop_daemon,
    wait_for,
)

CLIENTS = 32
EVENT_ROWS = OUTBOX.c.subject.like("%.event.accepted")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _api_key(env: dict[str, str], cwd: Path) -> str:
    return subprocess.run(
        [sys.executable, "-m", "delivery", "keys", "create", "--project", "storm"],
        env=env,
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


async def _ready(base_url: str, within: float) -> None:
    async with httpx.AsyncClient(base_url=base_url) as client:

        async def up() -> bool:
            try:
                return (await client.get("/ready")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(up, within)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sigkill_during_an_event_storm_gives_one_notification_each(
    kind: str, tmp_path: Path, nats_url: str, subject_prefix: str
) -> None:
    """Every accepted event is recorded, and every recorded one has one notification."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = _free_port()
    url, pg_url, extra = await crash_database(kind, data_dir, nats_url, subject_prefix)
    env = daemon_env(data_dir, **extra) | {"DELIVERY_PORT": str(port)}
    await migrate(url)
    key = await asyncio.to_thread(_api_key, env, tmp_path)
    engine = create_engine(url)
    log = tmp_path / "run.log"
    base_url = f"http://127.0.0.1:{port}"
    proc: asyncio.subprocess.Process | None = None
    held = (EVENT_ROWS, OUTBOX.c.sent_at.is_(None), OUTBOX.c.available_at > OUTBOX.c.created_at)
    accepted: list[str] = []
    try:
        proc = await start_daemon(env, log)
        await _ready(base_url, within=60)
        stop = asyncio.Event()

        async def client(c: int, http: httpx.AsyncClient) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"user_id": f"user_{(c * 31 + n) % 200}", "event_type": "level_up"}
                try:
                    answer = await http.post("/api/v1/agents/agent_1/events", json=body)
                except httpx.TransportError:
                    return  # the process is gone: this request's outcome is unknown
                if answer.status_code == 200:
                    accepted.append(answer.json()["event_id"])

        async def mid_handoff() -> bool:
            # Some notifications made, and some events waiting in the queue (their
            # rows held, not yet stamped).
            return await count(engine, NOTIFICATIONS) > 0 and await count(engine, OUTBOX, *held) > 0

        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(
            base_url=base_url, headers=headers, limits=limits, timeout=30
        ) as http:
            storm = [asyncio.create_task(client(c, http)) for c in range(CLIENTS)]
            try:
                await wait_for(mid_handoff, within=90)
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
            finally:
                stop.set()
                await asyncio.gather(*storm)
        held_at_kill = await count(engine, OUTBOX, *held)
        assert held_at_kill > 0, "no event was waiting in the hand-off at the kill"
        await assert_stamped_have_notifications(engine, EVENT_ROWS)
        recorded = {r.id for r in await rows(engine, select(EVENTS.c.id))}
        assert len(recorded) < len(accepted) + CLIENTS, "an answer for each recorded event"
        assert set(accepted) <= recorded, "an event answered 200 was not recorded"
        assert len(accepted) == len(set(accepted))

        # The embedded nats-server (SQLite) follows its parent down; give it a moment.
        await asyncio.sleep(1.0)
        proc = await start_daemon(env, log)

        async def all_done() -> bool:
            unsent = await count(engine, OUTBOX, EVENT_ROWS, OUTBOX.c.sent_at.is_(None))
            return unsent == 0 and await count(engine, NOTIFICATIONS) >= len(recorded)

        # PostgreSQL: the held rows wait for the grace (30 s) before the relay takes them.
        await wait_for(all_done, within=240)
        await stop_daemon(proc)
        proc = None

        await assert_one_notification_each(engine, recorded)
        assert await outbox_rows_per_message(engine, EVENT_ROWS) == {1}
        # Handed over or relayed, each notification continues its request's id.
        created = await rows(
            engine,
            select(OUTBOX.c.headers).where(OUTBOX.c.subject.like("%.notification.created")),
        )
        assert len(created) == len(recorded)
        assert all(r.headers and "X-Request-Id" in json.loads(r.headers) for r in created)
        if kind == "sqlite":
            assert b'"handoff_released"' in log.read_bytes()
    finally:
        await reap_daemon(proc)
        await engine.dispose()
        await drop_crash_database(pg_url, nats_url, subject_prefix)
