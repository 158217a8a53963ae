"""
One `delivery run` process, observed from outside: the request id a client sends
comes back and reaches the webhook worker's log line, through the outbox and NATS;
uvicorn's own lines are structlog JSON; the Grafana dashboard and the metrics
reference name exactly what `/metrics` exports.
"""

import asyncio
import json
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from tests.daemon.helpers import delete_stream
from tests.daemon.ops_process import exported_names, started
from tests.daemon.promql import PromQLError, metric_names
from tests.fixtures.http import ServeApp

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "delivery.json"
REFERENCE = ROOT / "deploy" / "METRICS.md"
KEY = "dk_test_observability_0123456789abcdef"
REQUEST_ID = "obs-request-7f3a"


class Receiver:
    """A webhook receiver that answers 204 and remembers each body (server thread)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.arrived = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(json.loads(body))
        self.arrived.set()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_promql_names_are_read_from_expressions() -> None:
    """The small PromQL reader finds selectors and skips functions, labels and groupings."""
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{status=~"5.."}[5m])))'
        " / clamp_min(sum without (x) (b_total offset 5m), 1e-9) + on(instance) c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    with pytest.raises(PromQLError):
        metric_names("sum(rate(a[5m])")
    for expr in dashboard_exprs():
        assert metric_names(expr), expr


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
async def test_one_request_id_from_the_api_to_the_webhook_and_the_exported_names(
    database_url: str,
    nats_url: str,
    subject_prefix: str,
    tmp_path: Path,
    http_server: ServeApp,
) -> None:
    receiver = Receiver()
    hook = http_server(receiver)
    try:
        async with started(
            "run",
            tmp_path / "run.log",
            port_setting="DELIVERY_PORT",
            DELIVERY_DATABASE_URL=database_url,
            DELIVERY_NATS_URL=nats_url,
            DELIVERY_SUBJECT_PREFIX=subject_prefix,
            DELIVERY_DATA_DIR=str(tmp_path / "data"),
            DELIVERY_BOOTSTRAP_API_KEY=KEY,
            DELIVERY_SECRET_KEY="observability-test-key",
            DELIVERY_WEBHOOK_ALLOW_NETS="127.0.0.0/8",
            DELIVERY_TICK_INTERVAL_S="0.2",
            DELIVERY_LOG_LEVEL="DEBUG",
        ) as proc:
            headers = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(base_url=proc.base_url, headers=headers) as client:
                registered = await client.put(
                    "/api/v1/webhooks/on_trigger_event", json={"webhook_url": hook + "/hook"}
                )
                assert registered.status_code == 200, registered.text
                accepted = await client.post(
                    "/api/v1/agents/agent_1/events",
                    json={"user_id": "u1", "event_type": "birthday"},
                    headers={"X-Request-Id": REQUEST_ID},
                )
                assert accepted.status_code == 200, accepted.text
                assert accepted.headers["x-request-id"] == REQUEST_ID
                assert await asyncio.to_thread(receiver.arrived.wait, 30), proc.tail()
                (body,) = receiver.bodies
                message_id = body["message_id"]
                assert body["trigger_event_id"] == accepted.json()["event_id"]

                async def delivered() -> dict[str, Any]:
                    while True:
                        for line in proc.lines():
                            if line["event"] == "webhook.delivered":
                                return line
                        await asyncio.sleep(0.1)

                line = await asyncio.wait_for(delivered(), 10)
                assert line["request_id"] == REQUEST_ID
                assert line["message_id"] == message_id
                # The sender logs the delivery when the receiver answers; the worker
                # counts it once the attempt's group commit is done, a moment later.
                counted = re.compile(
                    r'delivery_webhook_deliveries_total\{outcome="delivered",status_class="2xx"\} 1'
                )
                for _ in range(100):
                    text = (await client.get("/metrics")).text
                    if counted.search(text):
                        break
                    await asyncio.sleep(0.1)
                ready = await client.get("/ready")
                assert ready.status_code == 200, ready.text
                assert set(ready.json()["checks"]) == {
                    "database",
                    "migrations",
                    "nats",
                    "stream",
                    "consumers",
                    "scheduler",
                }
        lines = proc.lines()
    finally:
        await delete_stream(nats_url, subject_prefix)

    # One grep of the request id shows the path: API, dispatcher, webhook worker.
    with_request = {e["event"] for e in lines if e.get("request_id") == REQUEST_ID}
    assert {"request", "notification.created", "webhook.delivered"} <= with_request
    relayed = [e for e in lines if e["event"] == "outbox.publish"]
    assert {e.get("X-Request-Id") for e in relayed} == {REQUEST_ID}
    # ... and so does one grep of the message id.
    grep = [json.dumps(e) for e in lines if message_id in json.dumps(e)]
    assert any('"event": "request"' in g for g in grep)
    assert any('"event": "notification.created"' in g for g in grep)
    assert any('"event": "webhook.delivered"' in g for g in grep)

    # uvicorn's own lines arrive as structlog JSON, with its logger's name.
    uvicorn = [e for e in lines if e.get("logger") == "uvicorn.error"]
    assert any(e["event"].startswith("Started server process") for e in uvicorn), uvicorn
    assert all({"level", "timestamp"} <= set(e) for e in uvicorn)

    # The counters saw the work.
    assert re.search(
        r'delivery_webhook_deliveries_total\{outcome="delivered",status_class="2xx"\} 1', text
    )
    assert re.search(r'delivery_dispatch_messages_total\{outcome="created"\} 1', text)

    # The dashboard reads only names the service exports.
    exported = exported_names(text)
    used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    assert used - exported == set()
    # The reference lists every delivery_* family exported, and nothing else.
    families = {
        re.sub(r"_(bucket|sum|count)$", "", n) for n in exported if n.startswith("delivery_")
    }
    documented = set(re.findall(r"^\| `(delivery_\w+)`", REFERENCE.read_text(), re.MULTILINE))
    assert families == documented
