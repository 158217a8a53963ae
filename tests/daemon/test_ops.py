"""
`delivery scheduler`, `dispatcher` and `handlers` each serve /health, /ready and
/metrics on their own port (DELIVERY_OPS_PORT), as real processes on both databases;
/ready answers 503 naming NATS when NATS goes away.
"""

import asyncio
from pathlib import Path

import httpx
import pytest

from delivery.embedded import EmbeddedNats
from tests.daemon.helpers import delete_stream
from tests.daemon.ops_process import exported_names, started

pytestmark = pytest.mark.slow

EXPECTED = {
    "scheduler": (
        {"database", "migrations", "nats", "stream"},
        ["delivery_outbox_backlog ", "delivery_schedules_due_next_minute "],
        {"delivery_scheduler_fires_total", "delivery_scheduler_fire_lateness_seconds_bucket"},
    ),
    "dispatcher": (
        {"database", "migrations", "nats", "stream", "consumers"},
        ['delivery_jetstream_consumer_pending{consumer="dispatcher_fire"} '],
        {"delivery_dispatch_messages_total", "delivery_composer_duration_seconds_bucket"},
    ),
    "handlers": (
        {"database", "migrations", "nats", "stream", "consumers"},
        [
            'delivery_jetstream_consumer_pending{consumer="webhooks"} ',
            'delivery_jetstream_consumer_redelivered{consumer="channels"} ',
        ],
        {"delivery_webhook_deliveries_total", "delivery_channel_sends_total"},
    ),
}


@pytest.mark.parametrize("command", sorted(EXPECTED))
async def test_each_process_serves_health_ready_and_metrics(
    command: str, database_url: str, nats_url: str, subject_prefix: str, tmp_path: Path
) -> None:
    """Alive, ready with every check named, and its own metrics plus the process ones."""
    checks, samples, families = EXPECTED[command]
    try:
        async with (
            started(
                command,
                tmp_path / f"{command}.log",
                DELIVERY_DATABASE_URL=database_url,
                DELIVERY_NATS_URL=nats_url,
                DELIVERY_SUBJECT_PREFIX=subject_prefix,
                DELIVERY_DATA_DIR=str(tmp_path / "data"),
            ) as proc,
            httpx.AsyncClient(base_url=proc.base_url) as client,
        ):
            assert (await client.get("/health")).json() == {"status": "ok"}
            ready = await client.get("/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "ready"
            assert set(ready.json()["checks"]) == checks
            assert set(ready.json()["checks"].values()) == {"ok"}
            metrics = await client.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            text = metrics.text
            assert "delivery_database_up 1.0" in text
            assert "process_resident_memory_bytes " in text
            for sample in samples:
                assert sample in text, sample
            assert families <= exported_names(text)
            listening = [e for e in proc.lines() if e["event"] == "ops.listening"]
            assert [e["port"] for e in listening] == [int(proc.base_url.rsplit(":", 1)[1])]
    finally:
        await delete_stream(nats_url, subject_prefix)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_ready_names_nats_when_it_is_unreachable(
    database_url: str, subject_prefix: str, tmp_path: Path
) -> None:
    """A dispatcher whose NATS went away is alive but not ready, and says it is NATS."""
    server = EmbeddedNats(tmp_path / "nats")
    nats_url = server.start()
    try:
        async with (
            started(
                "dispatcher",
                tmp_path / "dispatcher.log",
                DELIVERY_DATABASE_URL=database_url,
                DELIVERY_NATS_URL=nats_url,
                DELIVERY_SUBJECT_PREFIX=subject_prefix,
            ) as proc,
            httpx.AsyncClient(base_url=proc.base_url, timeout=10) as client,
        ):
            assert (await client.get("/ready")).status_code == 200
            server.stop()
            ready = await client.get("/ready")
            assert ready.status_code == 503
            body = ready.json()
            assert body["status"] == "not_ready"
            assert "nats" in body["failing"]
            assert body["checks"]["nats"] == "NotReadyError: not connected"
            assert body["checks"]["database"] == "ok"
            assert (await client.get("/health")).status_code == 200
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            # NATS back: ready again (the client reconnects by itself).
            server.start()
            for _ in range(100):
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("not ready again after NATS came back")
    finally:
        server.stop()
