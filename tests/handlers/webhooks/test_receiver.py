"""The tenant-side receiver router: verification, replay protection, forwarding, errors."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import structlog
import typer
from fastapi import FastAPI
from standardwebhooks import Webhook
from typer.testing import CliRunner

from delivery.clock import ManualClock, SystemClock
from delivery.commands import receiver as receiver_command
from handlers.base import Delivered
from handlers.webhooks.receiver import (
    Claim,
    InMemoryDedupe,
    LoggingForwarder,
    VerifiedEvent,
    create_receiver_app,
    create_receiver_router,
)
from handlers.webhooks.sender import WebhookChannel, WebhookEndpoint
from handlers.webhooks.signing import Scheme, generate_secret, sign
from tests.fixtures.http import ServeApp
from tests.handlers.webhooks.test_sender import LOCAL, make_message

SECRET = generate_secret()
OLD = generate_secret()
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
PATH = "/webhooks/sonzai"


class Recorder:
    """A forwarder that keeps what it was given and can be told to fail."""

    def __init__(self, fail: int = 0) -> None:
        self.events: list[VerifiedEvent] = []
        self.fail = fail

    async def forward(self, event: VerifiedEvent) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("downstream is down")
        self.events.append(event)


def payload(event_id: str = "evt_1", **extra: object) -> bytes:
    body = {"event_id": event_id, "event_type": "on_wakeup_ready", "agent_id": "a", **extra}
    return json.dumps(body, separators=(",", ":")).encode()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def client(clock: ManualClock, recorder: Recorder) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.include_router(create_receiver_router([OLD, SECRET], forwarder=recorder, clock=clock))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as c:
        yield c


def signed(
    body: bytes, *, secrets: tuple[str, ...] = (SECRET,), at: datetime = T0
) -> dict[str, str]:
    return sign(body, msg_id=json.loads(body).get("event_id", "x"), secrets=secrets, now=at)


async def test_our_signed_delivery_is_forwarded(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    """A delivery signed by our sender is accepted and forwarded once with its fields."""
    body = payload()
    response = await client.post(PATH, content=body, headers=signed(body))
    assert response.status_code == 200
    assert response.json() == {"success": True, "event_id": "evt_1", "duplicate": False}
    [event] = recorder.events
    assert (event.event_id, event.event_type, event.scheme) == (
        "evt_1",
        "on_wakeup_ready",
        Scheme.STANDARD,
    )
    assert event.raw_body == body
    assert event.payload["agent_id"] == "a"


async def test_sonzai_signature_alone_is_accepted(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    """Only Sonzai-Signature: verified, and the event id comes from the body."""
    body = payload("evt_sz")
    headers = {"Sonzai-Signature": signed(body)["Sonzai-Signature"]}
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 200
    assert recorder.events[0].scheme is Scheme.SONZAI
    assert recorder.events[0].event_id == "evt_sz"


async def test_standardwebhooks_library_signed_request_is_accepted(
    client: httpx.AsyncClient, recorder: Recorder
) -> None:
    """A request signed by the reference library's Webhook.sign passes."""
    body = payload("evt_lib")
    signature = Webhook(SECRET).sign("msg_lib", T0, body.decode())
    headers = {
        "webhook-id": "msg_lib",
        "webhook-timestamp": str(int(T0.timestamp())),
        "webhook-signature": signature,
    }
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 200
    assert recorder.events[0].event_id == "msg_lib"  # webhook-id is the dedupe key


async def test_previous_secret_still_accepted(client: httpx.AsyncClient) -> None:
    """A receiver configured with both secrets accepts a delivery signed only by the old one."""
    body = payload()
    response = await client.post(PATH, content=body, headers=signed(body, secrets=(OLD,)))
    assert response.status_code == 200


async def test_replay_is_not_forwarded_again(client: httpx.AsyncClient, recorder: Recorder) -> None:
    """The same signed request twice: the second is acknowledged as a duplicate, not forwarded."""
    body = payload()
    headers = signed(body)
    first = await client.post(PATH, content=body, headers=headers)
    second = await client.post(PATH, content=body, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.json()["duplicate"] is True
    assert len(recorder.events) == 1


async def test_redelivery_with_fresh_signature_is_deduped(
    client: httpx.AsyncClient, recorder: Recorder, clock: ManualClock
) -> None:
    """A retry hours later, re-signed with a new timestamp but the same event id, is deduped."""
    body = payload()
    await client.post(PATH, content=body, headers=signed(body))
    later = clock.advance(timedelta(hours=5))
    again = await client.post(PATH, content=body, headers=signed(body, at=later))
    assert again.json()["duplicate"] is True
    assert len(recorder.events) == 1


async def test_tampered_body_is_401(client: httpx.AsyncClient, recorder: Recorder) -> None:
    """A body changed after signing is rejected with INVALID_SIGNATURE."""
    headers = signed(payload())
    response = await client.post(PATH, content=payload(agent="evil"), headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_SIGNATURE"
    assert recorder.events == []


async def test_stale_timestamp_is_401(client: httpx.AsyncClient, clock: ManualClock) -> None:
    """A delivery signed more than five minutes ago is rejected (captured-request replay)."""
    body = payload()
    headers = signed(body)
    clock.advance(timedelta(minutes=5, seconds=1))
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["code"] == "TIMESTAMP_OUT_OF_TOLERANCE"


async def test_wrong_secret_is_401(client: httpx.AsyncClient) -> None:
    """A delivery signed with a secret the receiver does not hold is rejected."""
    body = payload()
    response = await client.post(
        PATH, content=body, headers=signed(body, secrets=(generate_secret(),))
    )
    assert response.status_code == 401
    assert response.json()["code"] == "INVALID_SIGNATURE"


async def test_unsigned_request_is_401(client: httpx.AsyncClient) -> None:
    """No signature headers at all: MISSING_SIGNATURE with a message saying what to send."""
    response = await client.post(PATH, content=payload())
    assert response.status_code == 401
    body = response.json()
    assert body["code"] == "MISSING_SIGNATURE"
    assert "Sonzai-Signature" in body["message"]


async def test_malformed_signature_is_400(client: httpx.AsyncClient) -> None:
    """A Sonzai-Signature that is not t=..,v1=.. is a 400."""
    response = await client.post(PATH, content=payload(), headers={"Sonzai-Signature": "nonsense"})
    assert response.status_code == 400
    assert response.json()["code"] == "MALFORMED_SIGNATURE"


async def test_signed_non_object_body_is_400(client: httpx.AsyncClient) -> None:
    """An authentic body that is not a JSON object is INVALID_PAYLOAD."""
    body = b"[1,2,3]"
    headers = sign(body, msg_id="evt_1", secrets=[SECRET], now=T0)
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_PAYLOAD"


async def test_sonzai_only_without_event_id_is_400(client: httpx.AsyncClient) -> None:
    """With only Sonzai-Signature the body must carry event_id to dedupe on."""
    body = b'{"event_type":"on_wakeup_ready"}'
    headers = {
        "Sonzai-Signature": sign(body, msg_id="x", secrets=[SECRET], now=T0)["Sonzai-Signature"]
    }
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["code"] == "INVALID_PAYLOAD"


async def test_oversized_body_is_413(clock: ManualClock) -> None:
    """Bodies beyond max_body_bytes are refused before verification."""
    app = FastAPI()
    app.include_router(create_receiver_router([SECRET], clock=clock, max_body_bytes=10))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        response = await c.post(PATH, content=payload())
    assert response.status_code == 413


async def test_forwarder_failure_is_503_and_retry_forwards(clock: ManualClock) -> None:
    """A failing forwarder answers 503 (sender retries) and the retry is forwarded, not deduped."""
    recorder = Recorder(fail=1)
    app = FastAPI()
    app.include_router(create_receiver_router([SECRET], forwarder=recorder, clock=clock))
    body = payload()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        with structlog.testing.capture_logs() as logs:
            first = await c.post(PATH, content=body, headers=signed(body))
        second = await c.post(PATH, content=body, headers=signed(body))
    assert first.status_code == 503
    assert first.json()["code"] == "FORWARD_FAILED"
    assert any(entry["event"] == "webhook.forward_failed" for entry in logs)
    assert second.status_code == 200
    assert second.json()["duplicate"] is False
    assert len(recorder.events) == 1


async def test_concurrent_duplicate_is_409(clock: ManualClock) -> None:
    """While an event is being forwarded, the same event again gets 409 so the sender retries."""
    release = asyncio.Event()
    entered = asyncio.Event()

    class Slow:
        async def forward(self, event: VerifiedEvent) -> None:
            entered.set()
            await release.wait()

    app = FastAPI()
    app.include_router(create_receiver_router([SECRET], forwarder=Slow(), clock=clock))
    body = payload()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        first = asyncio.create_task(c.post(PATH, content=body, headers=signed(body)))
        await asyncio.wait_for(entered.wait(), timeout=5)
        second = await c.post(PATH, content=body, headers=signed(body))
        release.set()
        assert (await first).status_code == 200
    assert second.status_code == 409
    assert second.json()["code"] == "DELIVERY_IN_PROGRESS"


async def test_in_memory_dedupe_expires_and_is_bounded() -> None:
    """Entries expire after the TTL and the oldest are dropped beyond max_entries."""
    dedupe = InMemoryDedupe(ttl=timedelta(minutes=10), max_entries=2)
    for key in ("a", "b", "c"):
        assert await dedupe.claim(key, T0) is Claim.NEW
        await dedupe.complete(key, T0)
    assert len(dedupe) == 2
    assert await dedupe.claim("a", T0) is Claim.NEW  # dropped as the oldest
    await dedupe.release("a")
    assert await dedupe.claim("c", T0) is Claim.DUPLICATE
    assert await dedupe.claim("c", T0 + timedelta(minutes=10)) is Claim.NEW


async def test_logging_forwarder_logs_ids() -> None:
    """The default forwarder writes one structured line with the event's ids."""
    event = VerifiedEvent(
        "evt_1", "on_wakeup_ready", {"agent_id": "a", "user_id": "u"}, Scheme.SONZAI, T0, b"{}"
    )
    with structlog.testing.capture_logs() as logs:
        await LoggingForwarder().forward(event)
    assert logs == [
        {
            "event": "webhook.received",
            "log_level": "info",
            "event_id": "evt_1",
            "event_type": "on_wakeup_ready",
            "scheme": "sonzai",
            "agent_id": "a",
            "user_id": "u",
            "message_id": None,
        }
    ]


def test_router_needs_a_valid_secret() -> None:
    """No secret, or a secret that is not whsec_ + base64, fails at construction."""
    with pytest.raises(ValueError, match="at least one"):
        create_receiver_router([])
    with pytest.raises(ValueError, match="base64"):
        create_receiver_router(["whsec_*"])


async def test_sender_to_real_receiver_end_to_end(http_server: ServeApp) -> None:
    """Our channel to the receiver app under uvicorn: forwarded once, the redelivery deduped."""
    recorder = Recorder()
    base = http_server(create_receiver_app([SECRET], forwarder=recorder))
    message = make_message("evt_e2e")
    ep = WebhookEndpoint(url=base + PATH, secrets=(SECRET,))
    async with WebhookChannel(clock=SystemClock(), allow_nets=LOCAL) as ch:
        first = await ch.deliver(message, ep)
        again = await ch.deliver(message, ep, attempt_number=2)
    assert isinstance(first.outcome, Delivered)
    assert isinstance(again.outcome, Delivered)
    assert json.loads(again.attempt.response_body or "")["duplicate"] is True
    assert [e.event_id for e in recorder.events] == ["evt_e2e"]
    assert recorder.events[0].payload == message.payload


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_receiver_command_serves_the_router() -> None:
    """`delivery receiver` with DELIVERY_RECEIVER_SECRETS verifies and acknowledges a delivery."""
    port = _free_port()
    env = {**os.environ, "DELIVERY_RECEIVER_SECRETS": f"{OLD},{SECRET}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "delivery",
            "receiver",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        with httpx.Client(base_url=base) as http:
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, "delivery receiver exited"
                assert time.monotonic() < deadline, "delivery receiver did not start"
                time.sleep(0.05)
            body = payload("evt_cli")
            ok = http.post(PATH, content=body, headers=signed(body, at=SystemClock().now()))
            bad = http.post(PATH, content=body)
        assert ok.status_code == 200
        assert bad.status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_receiver_command_requires_a_secret() -> None:
    """Without --secret or DELIVERY_RECEIVER_SECRETS the command exits with a usage error."""
    app = typer.Typer()
    app.callback()(lambda: None)
    receiver_command.register(app)
    result = CliRunner().invoke(app, ["receiver"], env={"DELIVERY_RECEIVER_SECRETS": ""})
    assert result.exit_code == 2
    assert "DELIVERY_RECEIVER_SECRETS" in result.output
