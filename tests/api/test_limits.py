"""
Bounded requests against the API under uvicorn with the production server
configuration, over raw sockets: a body past the cap is 413 before anything reads
it, a slow body is 408, slow or oversized headers close the connection, connections
past the cap are 503, and the live stream outlives every one of those bounds.
"""

import asyncio
import contextlib
import json
import socket
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from sqlalchemy import Table

from delivery.api.routes.stream import StreamConfig
from delivery.bus.messages import NotificationCreated
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.settings import Settings
from delivery.store.engine import create_engine
from delivery.store.sql import SqlStore
from delivery.store.tables import IDEMPOTENCY, WAKEUPS
from tests.api.notes import add_notifications, notification
from tests.api.server import ServedApi, serve_api
from tests.channels.sse import read_events

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
CAP = 64 * 1024
WAKEUPS_PATH = "/api/v1/agents/a1/wakeups"
PREFIX = b'{"user_id": "u1", "check_type": "c", "delay_hours": 1, "intent": "'
STREAM = "/api/v1/agents/a1/users/u1/notifications/stream"


def _settings(**changes: Any) -> Settings:
    values: dict[str, Any] = {
        "subject_prefix": "test",
        "max_body_bytes": CAP,
        "header_timeout_s": 5.0,
        "body_timeout_s": 5.0,
    }
    values.update(changes)
    return Settings(**values)


def _open(served: ServedApi) -> socket.socket:
    host, port = served.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _head(served: ServedApi, method: str, path: str, *extra: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: api.test",
        f"Authorization: Bearer {served.keys['alpha']}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket, within_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the next response on ``sock``; fails past ``within_s``."""
    sock.settimeout(within_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split(" ")[1]), headers, body


def _seconds_until_closed(sock: socket.socket, within_s: float) -> float:
    """How long the server took to close ``sock`` (EOF or reset); fails past ``within_s``."""
    started = time.monotonic()
    deadline = started + within_s
    try:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the connection is still open after {within_s} s"
            sock.settimeout(remaining)
            if not sock.recv(65536):
                break
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection is still open after {within_s} s") from None
    return time.monotonic() - started


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _counts(database_url: str, *tables: Table) -> list[int]:
    """Rows in each table, read from a test thread (the server has its own loop)."""

    async def count() -> list[int]:
        engine = create_engine(database_url)
        try:
            store = SqlStore(engine)
            return [await store.count(t) for t in tables]
        finally:
            await engine.dispose()

    return asyncio.run(count())


def test_oversized_content_length_is_413_before_reading(database_url: str) -> None:
    """A Content-Length past the cap is answered 413 at once, without waiting for the body."""
    with (
        serve_api(database_url, ManualClock(START), settings=_settings()) as served,
        _open(served) as sock,
    ):
        sock.sendall(
            _head(
                served,
                "POST",
                WAKEUPS_PATH,
                "Content-Type: application/json",
                f"Idempotency-Key: {uuid.uuid4().hex}",
                f"Content-Length: {CAP + 1}",
            )
        )
        # Not one body byte is sent: the answer cannot depend on reading it.
        status, headers, body = _response(sock)
        assert status == 413
        assert headers["x-request-id"]
        error = json.loads(body)
        assert error["code"] == "REQUEST_TOO_LARGE"
        assert error["errors"][0]["field"] == "body"
        assert str(CAP) in error["message"]
        _seconds_until_closed(sock, 5)
    assert _counts(database_url, WAKEUPS, IDEMPOTENCY) == [0, 0]


def test_413_reaches_a_client_still_uploading(database_url: str) -> None:
    """A client that uploads its whole oversized body before reading still gets its 413."""
    with (
        serve_api(database_url, ManualClock(START), settings=_settings()) as served,
        _open(served) as sock,
    ):
        # What a plain HTTP client does: send the declared body, then read. Closing the
        # socket on it with the body unread would reset the connection mid-upload.
        sock.sendall(_head(served, "POST", WAKEUPS_PATH, f"Content-Length: {100 * CAP}"))
        for _ in range(100):
            sock.sendall(b"x" * CAP)
        status, _, body = _response(sock)
        assert status == 413
        assert json.loads(body)["code"] == "REQUEST_TOO_LARGE"
        _seconds_until_closed(sock, 5)


def test_oversized_chunked_body_is_413(database_url: str) -> None:
    """A chunked body is answered 413 as soon as it passes the cap; one at the cap is served."""
    with (
        serve_api(database_url, ManualClock(START), settings=_settings()) as served,
        _open(served) as sock,
    ):
        sock.sendall(
            _head(
                served,
                "POST",
                WAKEUPS_PATH,
                "Content-Type: application/json",
                f"Idempotency-Key: {uuid.uuid4().hex}",
                "Transfer-Encoding: chunked",
            )
        )
        sent = 0
        for piece in (PREFIX, *([b"x" * 8192] * 8)):
            sock.sendall(_chunk(piece))
            sent += len(piece)
        assert sent > CAP
        # No last chunk: the answer must come from counting, not from the body's end.
        status, _, body = _response(sock)
        assert status == 413
        assert json.loads(body)["code"] == "REQUEST_TOO_LARGE"
        _seconds_until_closed(sock, 5)
        assert _counts(database_url, WAKEUPS, IDEMPOTENCY) == [0, 0]

        # Exactly the cap, streamed in pieces (JSON allows the padding): served whole,
        # and the Idempotency-Key replay sees the same body.
        doc = PREFIX + b'hi"}'
        padded = doc[:-1] + b" " * (CAP - len(doc)) + b"}"
        assert len(padded) == CAP
        key = {"Authorization": f"Bearer {served.keys['alpha']}", "Idempotency-Key": "k-cap"}
        with httpx.Client(base_url=served.base_url, headers=key, timeout=10) as client:
            answers = [
                client.post(
                    WAKEUPS_PATH,
                    content=(padded[i : i + 10_000] for i in range(0, CAP, 10_000)),
                )
                for _ in range(2)
            ]
        assert [a.status_code for a in answers] == [201, 201], answers[0].text
        assert answers[0].json() == answers[1].json()
    assert _counts(database_url, WAKEUPS) == [1]


def test_slow_body_is_408_and_closed(database_url: str) -> None:
    """A body still incomplete after the body timeout is answered 408 and the connection closed."""
    settings = _settings(body_timeout_s=0.5)
    with (
        serve_api(database_url, ManualClock(START), settings=settings) as served,
        _open(served) as sock,
    ):
        sock.sendall(_head(served, "POST", WAKEUPS_PATH, "Content-Length: 100") + PREFIX[:10])
        started = time.monotonic()
        status, _, body = _response(sock, within_s=5)
        waited = time.monotonic() - started
        assert status == 408
        assert json.loads(body)["code"] == "REQUEST_TIMEOUT"
        assert 0.3 < waited < 3, waited
        _seconds_until_closed(sock, 2)
    assert _counts(database_url, WAKEUPS) == [0]


def test_slow_or_silent_headers_are_closed(database_url: str) -> None:
    """A connection that sends no request, or its headers too slowly, is closed after the bound."""
    with serve_api(database_url, ManualClock(START), settings=_settings(header_timeout_s=0.5)) as (
        served
    ):
        with _open(served) as silent:
            assert 0.3 < _seconds_until_closed(silent, 5) < 3

        with _open(served) as trickle:
            trickle.sendall(b"GET /health HTTP/1.1\r\nHost: api.test\r\n")
            lines = 0
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                for n in range(30):  # one header line every 0.1 s, never the blank line
                    time.sleep(0.1)
                    trickle.sendall(f"X-Slow-{n}: 1\r\n".encode())
                    lines += 1
            assert lines < 20, "the server kept reading a trickle of header lines"
            _seconds_until_closed(trickle, 3)

        # Kept alive after a first answer: the next request's headers are timed too.
        with _open(served) as kept:
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: api.test\r\n\r\n")
            assert _response(kept)[0] == 200
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            assert _seconds_until_closed(kept, 3) < 2.5


def test_oversized_headers_are_431(database_url: str) -> None:
    """Header lines past 64 KiB are answered 431 and the connection closed."""
    with (
        serve_api(database_url, ManualClock(START), settings=_settings()) as served,
        _open(served) as sock,
    ):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: api.test\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for n in range(20):
                sock.sendall(f"X-Pad-{n}: {'a' * 8000}\r\n".encode())
        status, _, body = _response(sock)
        assert status == 431
        assert json.loads(body)["code"] == "HEADERS_TOO_LARGE"
        _seconds_until_closed(sock, 3)


def test_connections_past_the_cap_are_503(database_url: str) -> None:
    """Past max_connections a new connection is answered 503 and closed; a freed slot is reused."""
    with serve_api(database_url, ManualClock(START), settings=_settings(max_connections=3)) as (
        served
    ):
        held = [_open(served) for _ in range(3)]
        try:
            for sock in held:  # answered, so the server has surely counted each one
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: api.test\r\n\r\n")
                assert _response(sock)[0] == 200
            with _open(served) as extra:
                status, _, body = _response(extra)
                assert status == 503
                assert json.loads(body)["code"] == "TOO_MANY_CONNECTIONS"
                _seconds_until_closed(extra, 3)
            held.pop().close()
            deadline = time.monotonic() + 5
            while True:
                with _open(served) as again:
                    again.sendall(b"GET /health HTTP/1.1\r\nHost: api.test\r\n\r\n")
                    if _response(again)[0] == 200:
                        break
                assert time.monotonic() < deadline, "the freed slot was never reused"
                time.sleep(0.05)
        finally:
            for sock in held:
                sock.close()


def _slow_clients(served: ServedApi) -> list[socket.socket]:
    """One connection stalled in its headers, one in its body."""
    slow_head = _open(served)
    slow_head.sendall(b"GET /health HTTP/1.1\r\n")
    slow_body = _open(served)
    slow_body.sendall(_head(served, "POST", WAKEUPS_PATH, "Content-Length: 100") + b"{")
    return [slow_head, slow_body]


async def test_stream_outlives_the_bounds(
    database_url: str, nats_url: str, subject_prefix: str, tmp_path: Path
) -> None:
    """A live stream keeps flowing long past every read bound, while slow clients are dropped."""
    settings = _settings(
        subject_prefix=subject_prefix,
        nats_url=nats_url,
        data_dir=tmp_path,
        header_timeout_s=0.3,
        body_timeout_s=0.3,
        max_connections=3,
    )
    state = {"stream_config": StreamConfig(heartbeat_s=0.2)}
    nc = await nats.connect(nats_url)
    engine = create_engine(database_url)
    try:
        with serve_api(database_url, ManualClock(START), settings=settings, state=state) as served:
            auth = {"Authorization": f"Bearer {served.keys['alpha']}"}
            async with (
                httpx.AsyncClient(base_url=served.base_url, headers=auth, timeout=10) as client,
                client.stream("GET", STREAM) as live,
            ):
                assert live.status_code == 200
                events = read_events(live)
                assert "connected" in (await anext(events)).comments
                opened = time.monotonic()
                # The stream holds one of the three connections; the two slow clients
                # take the rest until the header and body timeouts drop them.
                slow = _slow_clients(served)
                closed = [await asyncio.to_thread(_seconds_until_closed, sock, 3) for sock in slow]
                for sock in slow:
                    sock.close()
                assert all(s < 2.5 for s in closed), closed
                beats = 0
                while time.monotonic() - opened < 1.5:  # five times both read bounds
                    async with asyncio.timeout(5):
                        block = await anext(events)
                    beats += "heartbeat" in block.comments
                assert beats >= 3

                # The freed connections serve a second stream, and both get new messages.
                async with client.stream("GET", STREAM) as second:
                    assert second.status_code == 200
                    second_events = read_events(second)
                    assert "connected" in (await anext(second_events)).comments
                    row = notification(served.projects["alpha"], "a1", "u1", 1, START)
                    await add_notifications(engine, [row])
                    created = NotificationCreated(
                        notification_id=str(row["id"]),
                        project_id=str(row["project_id"]),
                        agent_id="a1",
                        user_id="u1",
                        event_type=str(row["event_type"]),
                    )
                    await nc.publish(
                        Subjects(subject_prefix).notification_created,
                        created.model_dump_json().encode(),
                    )
                    for stream in (events, second_events):
                        async with asyncio.timeout(5):
                            while (block := await anext(stream)).event != "notification":
                                pass
                        assert block.id == row["id"]
                assert time.monotonic() - opened > 1.5
    finally:
        await engine.dispose()
        await nc.close()
