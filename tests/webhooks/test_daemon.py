"""
The whole path in one daemon (API, scheduler, relay, dispatcher, handlers on SQLite and
a real NATS): a wakeup fires, its notification is pushed to a registered webhook, the
tenant's receiver router verifies the signature, and the message is consumed.
"""

import asyncio
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from starlette.types import ASGIApp, Receive, Scope, Send

from delivery.daemon import ALL_PARTS, Daemon
from delivery.settings import Settings
from handlers.webhooks import VerifiedEvent, create_receiver_app
from tests.fixtures.http import ServeApp

KEY = "dk_test_webhook_daemon_0123456789abcdef"


@dataclass
class Collected:
    """The tenant's forwarder: remembers verified events (runs in the server's thread)."""

    events: list[VerifiedEvent] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)

    async def forward(self, event: VerifiedEvent) -> None:
        self.events.append(event)
        self.arrived.set()


@dataclass
class LateApp:
    """Serves ``app`` once it is set: the receiver needs the secret the URL registers."""

    app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert self.app is not None
        await self.app(scope, receive, send)


@pytest.fixture
def settings(tmp_path: Path, nats_url: str, subject_prefix: str) -> Settings:
    """Embedded settings with loopback webhooks allowed and a fixed at-rest key."""
    return Settings(
        data_dir=tmp_path / "data",
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        port=0,
        tick_interval_s=0.2,
        bootstrap_api_key=SecretStr(KEY),
        secret_key=SecretStr("daemon-test-key"),
        webhook_allow_nets="127.0.0.0/8",
    )


async def test_a_fired_wakeup_reaches_the_tenant_receiver_and_is_consumed(
    settings: Settings, http_server: ServeApp
) -> None:
    """Wakeup -> notification -> signed webhook verified by the receiver -> consumed."""
    late = LateApp()
    base = http_server(late)
    daemon = Daemon(settings, parts=ALL_PARTS)
    running = asyncio.create_task(daemon.run(install_signals=False))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 30)
        assert daemon.api_url is not None
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=daemon.api_url, headers=headers) as client:
            registered = await client.put(
                "/api/v1/webhooks/on_wakeup_ready",
                json={"webhook_url": base + "/webhooks/sonzai"},
            )
            assert registered.status_code == 200, registered.text
            collected = Collected()
            late.app = create_receiver_app(
                [registered.json()["signing_secret"]], forwarder=collected
            )
            created = await client.post(
                "/api/v1/agents/agent_1/wakeups",
                json={"user_id": "u1", "check_type": "reminder", "intent": "hi", "delay_hours": 0},
            )
            assert created.status_code == 201, created.text
            # Normally well under a second. This failed now and then at 20 s, most
            # likely because FastStream's pull loop dropped a fetched batch on nats-py's
            # bare timeout and JetStream redelivered it after ack_wait (fixed in
            # delivery.bus.consumers). A miss says where the notification stopped.
            if not await asyncio.to_thread(collected.arrived.wait, 20):
                notes = await client.get(
                    "/api/v1/agents/agent_1/notifications", params={"user_id": "u1"}
                )
                tried = await client.get("/api/v1/webhooks/on_wakeup_ready/attempts")
                raise AssertionError(
                    f"no webhook after 20 s; notifications {notes.text}; attempts {tried.text}"
                )
            (event,) = collected.events
            assert event.event_type == "on_wakeup_ready"
            assert event.payload["wakeup_id"] == created.json()["wakeup_id"]

            async def consumed() -> list[dict[str, str]]:
                while True:
                    page = await client.get(
                        "/api/v1/agents/agent_1/notifications",
                        params={"user_id": "u1", "status": "consumed"},
                    )
                    items: list[dict[str, str]] = page.json()["notifications"]
                    if items:
                        return items
                    await asyncio.sleep(0.05)

            (note,) = await asyncio.wait_for(consumed(), 10)
            assert note["message_id"] == event.event_id
            attempts = await client.get("/api/v1/webhooks/on_wakeup_ready/attempts")
            assert [a["status"] for a in attempts.json()["attempts"]] == ["success"]
    finally:
        daemon.request_stop()
        await asyncio.wait_for(running, 60)
    running.result()
