"""
Kill the handlers process mid-retry: a subprocess running the webhook
worker is SIGKILLed while some deliveries wait for their retry and others are in flight;
after a restart on the same database every message is delivered at least once, always
with the same event id (``webhook-id``).
"""

import asyncio
import json
import os
import signal
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from sqlalchemy import select
from starlette.types import Receive, Scope, Send

from delivery.clock import SystemClock
from delivery.secrets import SecretBox
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore
from delivery.store.tables import NOTIFICATIONS
from delivery.store.webhooks import DELIVERIES, NewNotification, WebhookStore
from handlers.webhooks.signing import generate_secret
from tests.fixtures.http import ServeApp
from tests.webhooks.helpers import EVENT, add_notifications, notification_row, webhook_settings
from tests.worker_proc import start_worker

TOTAL = 12
HANG_S = 2.0
"""How long the receiver holds an odd message's first request: the kill lands inside it."""
TIMEOUT_S = 3.0
LEASE_S = 4.0
"""Longer than the send timeout; on PostgreSQL a killed worker's claims expire after it."""


@dataclass
class FlakyReceiver:
    """
    First request per event fails: even messages get 500 at once (they wait for a
    retry at the kill), odd ones hang for :data:`HANG_S` first (in flight at the kill).
    Every later request gets 200, so a 200 proves a delivery after the restart.
    """

    expected: int
    seen: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    mismatched: list[str] = field(default_factory=list)
    all_first_seen: threading.Event = field(default_factory=threading.Event)
    all_delivered: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        event_id = headers["webhook-id"]
        n = int(event_id.rsplit("_", 1)[1])
        with self._lock:
            first = not self.seen[event_id]
            if json.loads(body)["event_id"] != event_id:
                self.mismatched.append(event_id)
        status = 200
        if first:
            status = 500
            if n % 2:
                # Answered long after the kill: the worker never learns how it went.
                await asyncio.sleep(HANG_S)
        with self._lock:
            self.seen[event_id].append(status)
            if len(self.seen) == self.expected:
                self.all_first_seen.set()
            if sum(200 in s for s in self.seen.values()) == self.expected:
                self.all_delivered.set()
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.mark.slow
async def test_sigkill_mid_retry_then_restart_delivers_everything(
    database_url: str, http_server: ServeApp
) -> None:
    """Every message reaches the receiver with a 2xx after a SIGKILL and a restart."""
    await migrate(database_url)
    settings = webhook_settings()
    receiver = FlakyReceiver(expected=TOTAL)
    url = http_server(receiver) + "/hook"
    engine = create_engine(database_url)
    clock = SystemClock()
    try:
        project = (await SqlStore(engine).keys.ensure_project("alpha", clock.now())).id
        box = SecretBox.from_settings(settings)
        webhooks = WebhookStore(engine)
        await webhooks.upsert_endpoint(
            project,
            EVENT,
            url=url,
            auth_header_enc=None,
            new_secret_enc=box.seal(generate_secret()),
            now=clock.now(),
        )
        rows = [notification_row(project, n, clock.now()) for n in range(TOTAL)]
        await add_notifications(engine, rows)
        await webhooks.enqueue(
            [NewNotification(r["id"], project, EVENT) for r in rows], now=clock.now()
        )

        env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
        env |= {
            "DELIVERY_DATABASE_URL": database_url,
            "DELIVERY_SECRET_KEY": settings.secret_key.get_secret_value()
            if settings.secret_key
            else "",
            "DELIVERY_WEBHOOK_ALLOW_NETS": "127.0.0.0/8",
            "DELIVERY_WEBHOOK_TIMEOUT_S": str(TIMEOUT_S),
            "DELIVERY_LOG_LEVEL": "WARNING",
        }
        worker = await start_worker("webhooks", LEASE_S, env)
        try:
            assert await asyncio.to_thread(receiver.all_first_seen.wait, 20)
        finally:
            await worker.stop(signal.SIGKILL)
        async with engine.connect() as conn:
            pending = (
                await conn.execute(select(DELIVERIES.c.id).where(DELIVERIES.c.status == "pending"))
            ).all()
        assert len(pending) == TOTAL  # none finished: half wait to retry, half were in flight

        worker = await start_worker("webhooks", LEASE_S, env)
        try:
            assert await asyncio.to_thread(receiver.all_delivered.wait, 30)

            async def settled() -> bool:
                statuses = {d["status"] for d in await webhooks.deliveries()}
                return statuses == {"delivered"}

            async with asyncio.timeout(10):
                # Another process writes the database: there is no event to wait on.
                while not await settled():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await worker.stop(signal.SIGTERM)

        assert receiver.mismatched == []
        assert set(receiver.seen) == {r["id"] for r in rows}
        for statuses in receiver.seen.values():
            assert 200 in statuses
        async with engine.connect() as conn:
            consumed = (
                await conn.execute(
                    select(NOTIFICATIONS.c.status).where(NOTIFICATIONS.c.project_id == project)
                )
            ).scalars()
            assert set(consumed) == {"consumed"}
    finally:
        await engine.dispose()
