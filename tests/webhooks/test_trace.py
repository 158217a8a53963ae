"""
Tracing on, the whole path in one daemon: an API request, the dispatcher's
composition (the accepted event handed to it in-process, its request's trace context
with it), the outbox relay, NATS and the webhook attempt to a real local receiver are
spans of one trace, linked across NATS by ``traceparent``.
"""

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import SecretStr
from starlette.types import Receive, Scope, Send

from delivery import tracing
from delivery.daemon import ALL_PARTS, Daemon
from delivery.settings import Settings
from tests.fixtures.http import ServeApp

KEY = "dk_test_trace_daemon_0123456789abcdef"


class Receiver:
    """Answers 204 and remembers the headers of each webhook (server thread)."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.arrived = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        self.arrived.set()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)


async def test_one_trace_from_the_request_to_the_webhook_attempt(
    spans: InMemorySpanExporter,
    database_url: str,
    tmp_path: Path,
    nats_url: str,
    subject_prefix: str,
    http_server: ServeApp,
) -> None:
    receiver = Receiver()
    hook = http_server(receiver)
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        nats_url=nats_url,
        subject_prefix=subject_prefix,
        port=0,
        tick_interval_s=0.2,
        bootstrap_api_key=SecretStr(KEY),
        secret_key=SecretStr("trace-test-key"),
        webhook_allow_nets="127.0.0.0/8",
    )
    daemon = Daemon(settings, parts=ALL_PARTS)
    running = asyncio.create_task(daemon.run(install_signals=False))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 30)
        assert daemon.api_url is not None
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=daemon.api_url, headers=headers) as client:
            registered = await client.put(
                "/api/v1/webhooks/on_trigger_event", json={"webhook_url": hook + "/hook"}
            )
            assert registered.status_code == 200, registered.text
            spans.clear()
            accepted = await client.post(
                "/api/v1/agents/agent_1/events", json={"user_id": "u1", "event_type": "birthday"}
            )
            assert accepted.status_code == 200, accepted.text
            assert await asyncio.to_thread(receiver.arrived.wait, 30)

            async def attempt() -> ReadableSpan:
                while True:
                    for span in spans.get_finished_spans():
                        if span.name == "webhook attempt":
                            return span
                    await asyncio.sleep(0.05)

            webhook = await asyncio.wait_for(attempt(), 10)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(running, 60)
    running.result()

    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.name == "POST /api/v1/agents/{agent_id}/events"]
    assert request.kind is SpanKind.SERVER
    assert request.attributes is not None
    assert request.attributes["http.response.status_code"] == 200
    assert request.context is not None
    assert webhook.context is not None
    trace_id = request.context.trace_id
    assert webhook.context.trace_id == trace_id
    in_trace = [s for s in finished if s.context is not None and s.context.trace_id == trace_id]
    names = [s.name for s in in_trace]
    # One publish: notification.created. The event went to the dispatcher in-process.
    assert names.count("outbox publish") == 1
    assert names.count("dispatch compose") == 1
    assert names.count("webhook attempt") == 1
    # Each hop is the child of the one before it: the chain is unbroken.
    by_id = {s.context.span_id: s for s in in_trace if s.context is not None}
    chain = []
    span: ReadableSpan | None = webhook
    while span is not None:
        chain.append(span.name)
        span = by_id.get(span.parent.span_id) if span.parent is not None else None
    assert chain == [
        "webhook attempt",
        "outbox publish",
        "dispatch compose",
        "POST /api/v1/agents/{agent_id}/events",
    ]
