"""
The live stream with a real HTTP client against uvicorn and a real NATS server, on
SQLite and PostgreSQL: messages arrive in order, ``Last-Event-ID`` resumes from the
pending queue, heartbeats flow, tenants are apart, and a slow client's queue is bounded.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client as NatsClient
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.types import Message

from delivery.api.routes.stream import (
    _OVERFLOW,
    Listener,
    StreamConfig,
    StreamHub,
    StreamUnavailableError,
    _events,
)
from delivery.bus.messages import NotificationCreated
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.store.engine import create_engine
from delivery.store.notifications import SqlNotificationStore
from delivery.store.sql import SqlStore
from delivery.store.tables import NOTIFICATIONS
from tests.api.notes import add_notifications, notification
from tests.channels.conftest import channel_settings
from tests.channels.server import serve_api_with_state
from tests.channels.sse import SseEvent, read_events

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
A, U = "agent-1", "user-1"
PATH = f"/api/v1/agents/{A}/users/{U}/notifications/stream"


async def _publish(nc: NatsClient, subjects: Subjects, rows: list[dict[str, object]]) -> None:
    """What the outbox relay does after the rows commit: one message per notification."""
    for row in rows:
        created = NotificationCreated(
            notification_id=str(row["id"]),
            project_id=str(row["project_id"]),
            agent_id=str(row["agent_id"]),
            user_id=str(row["user_id"]),
            event_type=str(row["event_type"]),
        )
        await nc.publish(subjects.notification_created, created.model_dump_json().encode())
    await nc.flush()


async def _next_event(events: AsyncIterator[SseEvent], *, want: str) -> SseEvent:
    """The next block carrying ``want`` (``notification``, ``heartbeat``, ...), within 10 s."""
    async with asyncio.timeout(10):
        async for block in events:
            if want == "heartbeat" and "heartbeat" in block.comments:
                return block
            if block.event == want:
                return block
    raise AssertionError(f"stream ended before a {want!r} event")


async def test_stream_delivers_in_order_resumes_and_beats(
    database_url: str, nats_url: str, subject_prefix: str, tmp_path: Path
) -> None:
    """Live events arrive in publish order; a reconnect with Last-Event-ID replays the rest."""
    subjects = Subjects(subject_prefix)
    settings = channel_settings(tmp_path, nats_url=nats_url, subject_prefix=subject_prefix)
    config = StreamConfig(heartbeat_s=0.3, replay_limit=3)
    nc = await nats.connect(nats_url)
    engine = create_engine(database_url)
    try:
        with serve_api_with_state(
            database_url, ManualClock(START), settings, {"stream_config": config}
        ) as served:
            project = served.projects["alpha"]
            rows = [notification(project, A, U, n, START) for n in range(1, 7)]
            other_user = notification(project, A, "user-2", 7, START)
            async with (
                httpx.AsyncClient(
                    base_url=served.base_url,
                    headers={"Authorization": f"Bearer {served.keys['alpha']}"},
                    timeout=10,
                ) as client,
                httpx.AsyncClient(
                    base_url=served.base_url,
                    headers={"Authorization": f"Bearer {served.keys['beta']}"},
                    timeout=10,
                ) as foreign,
            ):
                async with (
                    client.stream("GET", PATH) as live,
                    foreign.stream("GET", PATH) as other_tenant,
                ):
                    assert live.status_code == 200
                    assert live.headers["content-type"].startswith("text/event-stream")
                    events = read_events(live)
                    first = await anext(events)
                    assert first.retry == "2000"
                    assert "connected" in first.comments
                    foreign_events = read_events(other_tenant)
                    assert "connected" in (await anext(foreign_events)).comments

                    await add_notifications(engine, [*rows[:3], other_user])
                    await _publish(nc, subjects, [rows[0], other_user, rows[1], rows[2]])
                    got = [await _next_event(events, want="notification") for _ in range(3)]
                    assert [e.id for e in got] == [r["id"] for r in rows[:3]]
                    entry = json.loads(got[0].data)
                    assert entry == {
                        "message_id": rows[0]["id"],
                        "agent_id": A,
                        "user_id": U,
                        "check_type": "reminder",
                        "generated_message": "hello 1",
                        "status": "pending",
                        "created_at": "2026-05-01T00:00:01Z",
                        "intent": "check in",
                    }
                    await _next_event(events, want="heartbeat")
                    # The other tenant, same agent and user ids, saw only heartbeats.
                    foreign_block = await _next_event(foreign_events, want="heartbeat")
                    assert foreign_block.event == ""

                # Offline: 4 and 5 are created, 4 is consumed by polling meanwhile.
                await add_notifications(engine, rows[3:5])
                await _publish(nc, subjects, rows[3:5])
                async with engine.begin() as conn:
                    await conn.execute(
                        update(NOTIFICATIONS)
                        .where(NOTIFICATIONS.c.id == rows[3]["id"])
                        .values(status="consumed", consumed_at=START)
                    )

                headers = {"Last-Event-ID": str(rows[2]["id"])}
                async with client.stream("GET", PATH, headers=headers) as resumed:
                    events = read_events(resumed)
                    replayed = await _next_event(events, want="notification")
                    assert replayed.id == rows[4]["id"], "consumed 4 is skipped, 5 replayed"
                    await add_notifications(engine, [rows[5]])
                    # 5 published again: a live copy of a replayed message is dropped.
                    await _publish(nc, subjects, [rows[4], rows[5]])
                    live_next = await _next_event(events, want="notification")
                    assert live_next.id == rows[5]["id"]

                # An unknown id replays the whole pending queue, one page per connection:
                # a full page (3) ends the stream, the reconnect with its last id resumes.
                unknown = {"Last-Event-ID": "msg_never_seen"}
                async with client.stream("GET", PATH, headers=unknown) as page:
                    got = [block async for block in read_events(page)]
                assert [b.id for b in got if b.event == "notification"] == [
                    r["id"] for r in rows[:3]
                ]
                assert got[-1].retry == "0", "a full page asks for an immediate reconnect"
                after = {"Last-Event-ID": str(rows[2]["id"])}
                async with client.stream("GET", PATH, headers=after) as rest:
                    events = read_events(rest)
                    ids = [(await _next_event(events, want="notification")).id for _ in range(2)]
                assert ids == [rows[4]["id"], rows[5]["id"]]
    finally:
        await engine.dispose()
        await nc.close()


async def test_stream_without_nats_is_503(database_url: str, tmp_path: Path) -> None:
    """A process with no message bus answers 503 STREAM_UNAVAILABLE instead of hanging."""
    with serve_api_with_state(
        database_url, ManualClock(START), channel_settings(tmp_path, nats_url=""), {}
    ) as served:
        async with httpx.AsyncClient(base_url=served.base_url, timeout=10) as client:
            response = await client.get(
                PATH, headers={"Authorization": f"Bearer {served.keys['alpha']}"}
            )
    assert response.status_code == 503
    assert response.json()["code"] == "STREAM_UNAVAILABLE"


async def test_slow_listener_queue_is_bounded(
    engine: AsyncEngine, nats_url: str, subject_prefix: str
) -> None:
    """A listener that reads nothing holds at most its queue size, then only the sentinel."""
    subjects = Subjects(subject_prefix)
    hub = StreamHub(SqlNotificationStore(engine), nats_url, subjects)
    nc = await nats.connect(nats_url)
    try:
        async with engine.begin() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO projects (id, name, created_at) VALUES ('proj_x', 'x', "
                "'2026-05-01 00:00:00.000000')"
                if engine.dialect.name == "sqlite"
                else "INSERT INTO projects (id, name, created_at) VALUES "
                "('proj_x', 'x', '2026-05-01T00:00:00Z')"
            )
        rows = [notification("proj_x", A, U, n, START) for n in range(1, 11)]
        await add_notifications(engine, rows)
        slow = await hub.add(("proj_x", A, U), queue_size=3)
        steady = await hub.add(("proj_x", A, U), queue_size=100)
        await _publish(nc, subjects, rows)
        async with asyncio.timeout(10):
            received = [await steady.queue.get() for _ in rows]
        assert [r["id"] for r in received] == [r["id"] for r in rows]  # type: ignore[index]
        assert slow.overflowed
        assert slow.queue.qsize() == 1
        assert slow.queue.get_nowait() is _OVERFLOW
        assert hub.connected == 2
        with pytest.raises(StreamUnavailableError):
            await hub.add(("proj_x", A, "user-3"), queue_size=3, max_clients=2)
        assert hub.connected == 2
    finally:
        await hub.remove(slow)
        await hub.remove(steady)
        assert hub.connected == 0
        assert hub.listeners == {}
        await nc.close()


def _with_deadline(row: dict[str, object], deadline: datetime | None) -> dict[str, object]:
    return {**row, "expires_at": deadline}


async def test_stream_never_shows_a_message_past_its_deadline(
    database_url: str, nats_url: str, subject_prefix: str, tmp_path: Path
) -> None:
    """
    A pending message whose deadline has passed (the expiry sweep not run yet) is
    neither streamed live nor replayed; a fresh one next to it is.
    """
    subjects = Subjects(subject_prefix)
    settings = channel_settings(tmp_path, nats_url=nats_url, subject_prefix=subject_prefix)
    clock = ManualClock(START + timedelta(minutes=1))
    nc = await nats.connect(nats_url)
    engine = create_engine(database_url)
    try:
        with serve_api_with_state(database_url, clock, settings, {}) as served:
            project = served.projects["alpha"]
            stale = _with_deadline(
                notification(project, A, U, 1, START), START + timedelta(seconds=30)
            )
            fresh = _with_deadline(notification(project, A, U, 2, START), None)
            async with httpx.AsyncClient(
                base_url=served.base_url,
                headers={"Authorization": f"Bearer {served.keys['alpha']}"},
                timeout=10,
            ) as client:
                async with client.stream("GET", PATH) as live:
                    events = read_events(live)
                    assert "connected" in (await anext(events)).comments
                    await add_notifications(engine, [stale, fresh])
                    await _publish(nc, subjects, [stale, fresh])
                    got = await _next_event(events, want="notification")
                    assert got.id == fresh["id"], "the stale message is not streamed"
                # The whole pending queue replayed: the stale one (queued first) is not.
                unknown = {"Last-Event-ID": "msg_never_seen"}
                async with client.stream("GET", PATH, headers=unknown) as resumed:
                    replayed = await _next_event(read_events(resumed), want="notification")
                    assert replayed.id == fresh["id"], "the stale message is not replayed"
    finally:
        await engine.dispose()
        await nc.close()


async def test_a_queued_message_is_checked_again_when_sent(engine: AsyncEngine) -> None:
    """A message that waited in a slow client's queue past its deadline is not sent."""
    project = (await SqlStore(engine).keys.ensure_project("x", START)).id
    stale = _with_deadline(notification(project, A, U, 1, START), START + timedelta(seconds=30))
    fresh = _with_deadline(notification(project, A, U, 2, START), None)
    await add_notifications(engine, [stale, fresh])
    store = SqlNotificationStore(engine)
    # Loaded while both were live, as the hub loads a message when it is published.
    loaded = await store.pending_by_id([str(stale["id"]), str(fresh["id"])], START)
    assert set(loaded) == {stale["id"], fresh["id"]}
    listener = Listener((project, A, U), asyncio.Queue())
    listener.offer(loaded[str(stale["id"])])
    listener.offer(loaded[str(fresh["id"])])

    async def connected() -> Message:
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    request = Request({"type": "http", "method": "GET", "headers": []}, receive=connected)
    clock = ManualClock(START + timedelta(minutes=1))  # the client read them late
    events = _events(request, listener, [], StreamConfig(heartbeat_s=5), clock)
    try:
        assert b"connected" in await anext(events)
        async with asyncio.timeout(5):
            sent = await anext(events)
        assert sent.startswith(f"id: {fresh['id']}\n".encode()), sent
    finally:
        await events.aclose()
