"""WebhookChannel against a real receiver (uvicorn in a thread): outcomes and attempt records."""

import asyncio
import dataclasses
import json
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from delivery.clock import Clock, ManualClock, SystemClock
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Message, Retry
from handlers.retry import MAX_ATTEMPTS, SCHEDULE, DeadLetter, Done, RetryAt, plan_next
from handlers.ssrf import StaticResolver, parse_allow_nets
from handlers.webhooks.sender import (
    AttemptStatus,
    WebhookChannel,
    WebhookDelivery,
    WebhookEndpoint,
    encode_body,
)
from handlers.webhooks.signing import generate_secret, verify
from tests.fixtures.http import ServeApp
from tests.handlers.webhooks.stub import Reply, ScriptedReceiver

LOCAL = parse_allow_nets("127.0.0.0/8")
SECRET = generate_secret()
PREVIOUS = generate_secret()


def mid() -> float:
    """Neutral jitter draw."""
    return 0.5


def make_message(event_id: str = "evt_01") -> Message:
    created = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    payload = {
        "event_id": event_id,
        "event_type": "on_wakeup_ready",
        "created_at": created.isoformat(),
        "project_id": "proj_1",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "message_id": "msg_1",
        "source_type": "wakeup",
        "wakeup_id": "wk_1",
        "check_type": "wakeup",
        "intent": "check in",
        "generated_message": "Good morning ☀️",
        "fire_at": created.isoformat(),
        "fire_at_local": "2026-03-01T10:00:00+01:00",
        "metadata": {},
    }
    return Message(
        event_id=event_id,
        event_type="on_wakeup_ready",
        project_id="proj_1",
        agent_id="agent_1",
        user_id="user_1",
        message_id="msg_1",
        check_type="wakeup",
        intent="check in",
        generated_message="Good morning ☀️",
        created_at=created,
        payload=payload,
    )


def channel(clock: Clock | None = None, **kwargs: Any) -> WebhookChannel:
    options: dict[str, Any] = {"allow_nets": LOCAL, "timeout": timedelta(seconds=5)} | kwargs
    return WebhookChannel(clock=clock or ManualClock(SystemClock().now()), **options)


def endpoint(url: str, *secrets: str, auth: str | None = None) -> WebhookEndpoint:
    return WebhookEndpoint(url=url, secrets=secrets or (SECRET,), auth_header=auth)


async def test_delivered_request_is_signed_and_recorded(http_server: ServeApp) -> None:
    """A 2xx is Delivered; the receiver got the exact body, both signatures and the auth header."""
    stub = ScriptedReceiver([Reply(200, b'{"ok":true}')])
    url = http_server(stub) + "/hooks/sonzai"
    message = make_message()
    clock = ManualClock(SystemClock().now())
    async with channel(clock) as ch:
        result = await ch.deliver(message, endpoint(url, auth="Bearer tenant-token"))
    assert result.outcome == Delivered(status_code=200)
    [seen] = stub.requests
    assert seen.path == "/hooks/sonzai"
    assert seen.body == encode_body(message)
    assert json.loads(seen.body) == message.payload
    assert seen.headers["authorization"] == "Bearer tenant-token"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["webhook-id"] == "evt_01"
    Webhook(SECRET).verify(seen.body, seen.headers)
    assert verify(
        seen.body, {"Sonzai-Signature": seen.headers["sonzai-signature"]}, [SECRET], now=clock.now()
    )
    attempt = result.attempt
    assert attempt.status is AttemptStatus.SUCCESS
    assert (attempt.attempt_number, attempt.response_code) == (1, 200)
    assert attempt.response_body == '{"ok":true}'
    assert attempt.request_body == seen.body.decode()
    assert attempt.error_message is None
    assert attempt.created_at == clock.now()
    assert (attempt.event_id, attempt.event_type, attempt.project_id) == (
        "evt_01",
        "on_wakeup_ready",
        "proj_1",
    )
    assert attempt.webhook_url == url
    assert attempt.duration_ms >= 0


async def _drive(
    ch: WebhookChannel, clock: ManualClock, ep: WebhookEndpoint
) -> tuple[list[WebhookDelivery], list[timedelta], object]:
    """What the daemon will do: attempt, plan, wait (by moving the clock), repeat."""
    message = make_message()
    results: list[WebhookDelivery] = []
    delays: list[timedelta] = []
    attempt_number = 1
    while True:
        result = await ch.deliver(message, ep, attempt_number=attempt_number)
        results.append(result)
        step = plan_next(result.outcome, attempt_number, now=clock.now(), rand=mid)
        if not isinstance(step, RetryAt):
            return results, delays, step
        delays.append(step.at - clock.now())
        clock.set(step.at)
        attempt_number = step.attempt_number


async def test_fails_first_attempts_then_delivers(http_server: ServeApp) -> None:
    """Three 5xx answers are retried on the schedule with the same event id, then delivered."""
    stub = ScriptedReceiver([Reply(500), Reply(503), Reply(502, b"bad gateway"), Reply(200)])
    clock = ManualClock(SystemClock().now())
    async with channel(clock) as ch:
        results, delays, final = await _drive(ch, clock, endpoint(http_server(stub)))
    assert final == Done()
    assert delays == list(SCHEDULE[1:4])
    assert [r.attempt.attempt_number for r in results] == [1, 2, 3, 4]
    assert [r.attempt.response_code for r in results] == [500, 503, 502, 200]
    assert [r.attempt.status for r in results] == [AttemptStatus.FAILED] * 3 + [
        AttemptStatus.SUCCESS
    ]
    assert results[2].attempt.error_message == "HTTP 502"
    assert results[2].attempt.response_body == "bad gateway"
    assert {r.headers["webhook-id"] for r in stub.requests} == {"evt_01"}
    # Every retry is signed afresh at its own (later) time.
    assert len({r.headers["webhook-timestamp"] for r in stub.requests}) == 4


async def test_always_failing_receiver_is_dead_lettered(http_server: ServeApp) -> None:
    """After the eighth failed attempt the delivery is dead-lettered."""
    stub = ScriptedReceiver([Reply(500)])
    clock = ManualClock(SystemClock().now())
    async with channel(clock) as ch:
        results, delays, final = await _drive(ch, clock, endpoint(http_server(stub)))
    assert isinstance(final, DeadLetter)
    assert not final.disable_destination
    assert len(results) == len(stub.requests) == MAX_ATTEMPTS
    assert delays == list(SCHEDULE[1:])


async def test_timeout_is_a_retried_attempt(http_server: ServeApp) -> None:
    """A receiver slower than the timeout yields Retry with response code 0 and no body."""
    stub = ScriptedReceiver([Reply(200, delay_s=0.6)])
    url = http_server(stub)
    async with channel(timeout=timedelta(seconds=0.15)) as ch:
        started = time.perf_counter()
        result = await ch.deliver(make_message(), endpoint(url))
        elapsed = time.perf_counter() - started
    assert isinstance(result.outcome, Retry)
    assert result.outcome.reason.startswith("timeout")
    assert result.attempt.response_code == 0
    assert result.attempt.response_body is None
    assert result.attempt.status is AttemptStatus.FAILED
    assert 0.1 <= elapsed < 0.5
    assert 100 <= result.attempt.duration_ms < 500


async def test_timeout_on_a_kept_alive_connection(http_server: ServeApp) -> None:
    """
    The deadline holds on a reused connection too (its own timer, not asyncio.timeout):
    a slow second answer on the first attempt's connection is a timed-out Retry, and
    the connection is dropped, so a third attempt gets its answer on a fresh one.
    """
    # A sized answer: one sent chunked ends its connection (provider_http.parse_response).
    sized = (("content-length", "2"),)
    stub = ScriptedReceiver(
        [Reply(200, headers=sized), Reply(200, headers=sized, delay_s=0.6), Reply(201)]
    )
    url = http_server(stub)
    async with channel(timeout=timedelta(seconds=0.15)) as ch:
        first = await ch.deliver(make_message("evt_a"), endpoint(url))
        assert ch._connections.idle_count == 1
        started = time.perf_counter()
        second = await ch.deliver(make_message("evt_b"), endpoint(url))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.6)  # the slow answer is written to a closed socket
        third = await ch.deliver(make_message("evt_c"), endpoint(url))
    assert isinstance(first.outcome, Delivered)
    assert isinstance(second.outcome, Retry)
    assert second.outcome.reason.startswith("timeout")
    assert second.attempt.response_code == 0
    assert 0.1 <= elapsed < 0.5
    assert isinstance(third.outcome, Delivered)
    assert third.attempt.response_code == 201


async def test_gone_disables_endpoint(http_server: ServeApp) -> None:
    """410 Gone is a permanent failure that disables the endpoint and dead-letters at once."""
    stub = ScriptedReceiver([Reply(410, b"gone")])
    clock = ManualClock(SystemClock().now())
    async with channel(clock) as ch:
        results, _, final = await _drive(ch, clock, endpoint(http_server(stub)))
    assert len(results) == 1
    assert isinstance(results[0].outcome, Failed)
    assert results[0].outcome.disable_destination
    assert final == DeadLetter(results[0].outcome.reason, disable_destination=True)


async def test_retry_after_is_honoured(http_server: ServeApp) -> None:
    """A 429 with Retry-After: 120 delays the next attempt by 120 s instead of 5 s."""
    stub = ScriptedReceiver([Reply(429, headers=(("Retry-After", "120"),)), Reply(200)])
    clock = ManualClock(SystemClock().now())
    async with channel(clock) as ch:
        results, delays, final = await _drive(ch, clock, endpoint(http_server(stub)))
    assert results[0].outcome == Retry("HTTP 429", status_code=429, after=timedelta(seconds=120))
    assert delays == [timedelta(seconds=120)]
    assert final == Done()


async def test_redirect_is_not_followed(http_server: ServeApp) -> None:
    """A 302 is a failed attempt; its Location is never requested."""
    stub = ScriptedReceiver([Reply(302, headers=(("Location", "http://169.254.169.254/"),))])
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(http_server(stub)))
    assert isinstance(result.outcome, Retry)
    assert len(stub.requests) == 1


async def test_connection_refused_is_retried() -> None:
    """A closed port is a connection error: Retry, response code 0."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://127.0.0.1:{port}/"))
    assert isinstance(result.outcome, Retry)
    assert result.outcome.reason.startswith("connection error")
    assert result.attempt.response_code == 0


async def test_name_resolving_to_loopback_refused_at_send_time(http_server: ServeApp) -> None:
    """Without an allowlist, a hostname that resolves to 127.0.0.1 is never connected to."""
    stub = ScriptedReceiver()
    port = httpx.URL(http_server(stub)).port
    resolver = StaticResolver({"hooks.tenant.test": ["127.0.0.1"]})
    async with channel(allow_nets=(), resolver=resolver) as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://hooks.tenant.test:{port}/"))
    assert isinstance(result.outcome, Failed)
    assert "127.0.0.1 is loopback" in result.outcome.reason
    assert not result.outcome.disable_destination
    assert result.attempt.response_code == 0
    assert stub.requests == []


async def test_dns_rebinding_is_refused_at_send_time(http_server: ServeApp) -> None:
    """A name that was public at registration and now points inside is refused at connect time."""
    stub = ScriptedReceiver()
    port = httpx.URL(http_server(stub)).port
    resolver = StaticResolver({"rebind.test": ["93.184.216.34", "127.0.0.1"]})
    async with channel(allow_nets=(), resolver=resolver) as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://rebind.test:{port}/"))
    assert isinstance(result.outcome, Failed)
    assert stub.requests == []


async def test_ip_literal_refused_at_send_time(http_server: ServeApp) -> None:
    """An IP-literal URL (which skips DNS) is checked too."""
    stub = ScriptedReceiver()
    url = http_server(stub)
    async with channel(allow_nets=()) as ch:
        result = await ch.deliver(make_message(), endpoint(url))
    assert isinstance(result.outcome, Failed)
    assert "loopback" in result.outcome.reason
    assert stub.requests == []


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("2002:7f00:1::", "embeds 127.0.0.1 is loopback"),
        ("2002:a9fe:a9fe::", "cloud metadata address"),
        ("fec0::1", "site-local"),
    ],
)
async def test_ipv6_forms_refused_at_send_time(address: str, why: str) -> None:
    """
    A 6to4 address around an internal IPv4 address, or a site-local one, is never
    connected to, as a literal or behind a name, even with 127.0.0.0/8 allowlisted.
    """
    resolver = StaticResolver({"hooks.tenant.test": [address]})
    async with channel(resolver=resolver) as ch:
        for url in (f"http://[{address}]:8080/", "http://hooks.tenant.test:8080/"):
            result = await ch.deliver(make_message(), endpoint(url))
            assert isinstance(result.outcome, Failed), (url, result.outcome)
            assert why in result.outcome.reason
            assert result.attempt.response_code == 0


async def test_allowlisted_name_connects_to_checked_address(http_server: ServeApp) -> None:
    """With 127.0.0.0/8 allowlisted the vetted address is used and Host keeps the name."""
    stub = ScriptedReceiver()
    port = httpx.URL(http_server(stub)).port
    resolver = StaticResolver({"hooks.tenant.test": ["127.0.0.1"]})
    async with channel(resolver=resolver) as ch:
        result = await ch.deliver(make_message(), endpoint(f"http://hooks.tenant.test:{port}/x"))
    assert isinstance(result.outcome, Delivered)
    assert stub.requests[0].headers["host"] == f"hooks.tenant.test:{port}"


async def test_bodies_are_truncated_on_the_record(http_server: ServeApp) -> None:
    """Request and response bodies beyond body_limit are cut and marked."""
    stub = ScriptedReceiver([Reply(500, b"x" * 100_000)])
    async with channel(body_limit=64) as ch:
        result = await ch.deliver(make_message(), endpoint(http_server(stub)))
    assert result.attempt.response_body == "x" * 64 + "…[truncated]"
    assert result.attempt.request_body.endswith("…[truncated]")
    assert len(result.attempt.request_body) == 64 + len("…[truncated]")


async def test_rotation_signs_with_both_secrets(http_server: ServeApp) -> None:
    """With two active secrets a receiver holding only the previous one still verifies."""
    stub = ScriptedReceiver()
    async with channel(SystemClock()) as ch:
        await ch.deliver(make_message(), endpoint(http_server(stub), SECRET, PREVIOUS))
    [seen] = stub.requests
    Webhook(PREVIOUS).verify(seen.body, seen.headers)
    Webhook(SECRET).verify(seen.body, seen.headers)


async def test_unusable_secret_fails_without_sending(http_server: ServeApp) -> None:
    """A stored secret that cannot sign is a permanent failure; nothing is sent."""
    stub = ScriptedReceiver()
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(http_server(stub), "whsec_!!"))
    assert isinstance(result.outcome, Failed)
    assert stub.requests == []


@pytest.mark.parametrize("auth", ["Bearer a\r\nX-Injected: 1", "Bearer a\x00b", "Bearer caf\u00e9"])
async def test_unsendable_auth_header_fails_without_sending(
    http_server: ServeApp, auth: str
) -> None:
    """
    A stored auth header that cannot be an HTTP field value is a permanent failure,
    not a retry that fails again for hours; nothing is sent and it is not echoed.
    """
    stub = ScriptedReceiver()
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(http_server(stub), auth=auth))
    assert isinstance(result.outcome, Failed), result.outcome
    assert "auth_header" in result.outcome.reason
    assert auth not in result.outcome.reason
    assert result.attempt.response_code == 0
    assert stub.requests == []


async def test_slow_endpoint_cannot_starve_others(http_server: ServeApp) -> None:
    """A slow endpoint holds at most per_endpoint slots; another endpoint is served meanwhile."""
    slow = ScriptedReceiver([Reply(200, delay_s=0.4)])
    fast = ScriptedReceiver()
    slow_url, fast_url = http_server(slow), http_server(fast)
    async with channel(max_in_flight=3, per_endpoint=2) as ch:
        slow_tasks = [
            asyncio.create_task(ch.deliver(make_message(f"evt_s{i}"), endpoint(slow_url)))
            for i in range(6)
        ]
        await asyncio.sleep(0.05)  # let the slow ones take their slots
        started = time.perf_counter()
        fast_result = await ch.deliver(make_message("evt_f"), endpoint(fast_url))
        fast_elapsed = time.perf_counter() - started
        slow_pending = sum(not t.done() for t in slow_tasks)
        await asyncio.gather(*slow_tasks)
    assert isinstance(fast_result.outcome, Delivered)
    assert fast_elapsed < 0.3
    assert slow_pending == 6
    assert slow.peak_in_flight == 2
    assert ch.endpoints_in_flight == 0


async def test_send_uses_directory_and_reports_attempts(http_server: ServeApp) -> None:
    """The Channel seam looks the endpoint up and hands the attempt to the sink."""
    stub = ScriptedReceiver()
    url = http_server(stub)
    recorded: list[WebhookDelivery] = []

    class Directory:
        async def lookup(self, destination: str, message: Message) -> WebhookEndpoint:
            return endpoint(destination)

    class Sink:
        async def record(self, message: Message, delivery: WebhookDelivery) -> None:
            recorded.append(delivery)

    async with channel(directory=Directory(), attempts=Sink()) as ch:
        outcome = await ch.send(make_message(), url)
    assert isinstance(outcome, Delivered)
    assert [d.outcome for d in recorded] == [outcome]


async def test_send_without_directory_is_a_programming_error() -> None:
    """send() needs a directory to find secrets; without one it says so."""
    async with channel() as ch:
        with pytest.raises(RuntimeError, match="EndpointDirectory"):
            await ch.send(make_message(), "https://hooks.example.com/")


async def test_from_settings_reads_webhook_settings() -> None:
    """from_settings applies DELIVERY_WEBHOOK_* values."""
    settings = Settings(webhook_allow_nets="127.0.0.0/8", webhook_timeout_s=2.5)
    async with WebhookChannel.from_settings(settings, clock=SystemClock()) as ch:
        assert ch._allow_nets == LOCAL
        assert ch._timeout_s == 2.5


def test_body_without_payload_uses_message_fields() -> None:
    """A Message built without a payload still sends the decision-3 core fields."""
    bare = Message(
        event_id="evt_9",
        event_type="on_trigger_event",
        project_id="p",
        agent_id="a",
        user_id="u",
        message_id="m",
        check_type="event",
        intent="i",
        generated_message="g",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    body = json.loads(encode_body(bare))
    assert body["event_id"] == "evt_9"
    assert body["created_at"] == "2026-01-01T00:00:00+00:00"


def test_body_bytes_are_json_dumps_compact_utf8() -> None:
    """
    The body is exactly ``json.dumps(payload, ensure_ascii=False, separators=(",", ":"))``
    as UTF-8, instants as ISO text: non-ASCII written as is, controls, quotes and
    backslashes escaped, floats as repr (NaN too), key order kept; a payload that holds
    itself is a ValueError and an unknown type a TypeError (both a permanent failure).
    """
    at = datetime(2026, 1, 1, 12, 30, tzinfo=UTC)
    payload: dict[str, Any] = {
        "z": 'héllo \u2028 \x00\x1f\x7f "q" \\ ✓',
        "a": [1, -0.0, 2.5, 1e300, float("nan"), float("inf"), True, None, 10**30],
        "nested": {"at": at, "empty": {}, "list": []},
    }
    message = dataclasses.replace(make_message(), payload=payload)
    expected = json.dumps(
        payload, ensure_ascii=False, separators=(",", ":"), default=lambda v: v.isoformat()
    )
    assert encode_body(message) == expected.encode()
    looped: list[Any] = []
    looped.append(looped)
    with pytest.raises(ValueError, match="Circular"):
        encode_body(dataclasses.replace(message, payload={"x": looped}))
    with pytest.raises(TypeError):
        encode_body(dataclasses.replace(message, payload={"x": object()}))


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/", "not a url", "https:///nohost"])
async def test_unusable_url_fails_without_crashing(url: str) -> None:
    """A stored URL that is not absolute http(s) is a permanent failure, not an exception."""
    async with channel() as ch:
        result = await ch.deliver(make_message(), endpoint(url))
    assert isinstance(result.outcome, Failed)
    assert result.attempt.response_code == 0


async def test_unencodable_payload_fails_without_crashing(http_server: ServeApp) -> None:
    """A payload that is not JSON-serialisable is a permanent, recorded failure."""
    stub = ScriptedReceiver()
    bad = dataclasses.replace(make_message(), payload={"x": object()})
    async with channel() as ch:
        result = await ch.deliver(bad, endpoint(http_server(stub)))
    assert isinstance(result.outcome, Failed)
    assert "JSON" in result.outcome.reason
    assert stub.requests == []


async def test_cookies_are_never_sent_back(http_server: ServeApp) -> None:
    """A receiver's Set-Cookie is not stored: later deliveries carry no Cookie header."""
    stub = ScriptedReceiver([Reply(200, headers=(("Set-Cookie", "session=abc; Path=/"),))])
    port = httpx.URL(http_server(stub)).port
    url = f"http://hooks.tenant.test:{port}/"  # a name: aiohttp's jar skips bare IPs anyway
    resolver = StaticResolver({"hooks.tenant.test": ["127.0.0.1"]})
    async with channel(resolver=resolver) as ch:
        await ch.deliver(make_message("evt_a"), endpoint(url))
        await ch.deliver(make_message("evt_b"), endpoint(url))
    assert all("cookie" not in r.headers for r in stub.requests)
