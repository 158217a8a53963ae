"""
The batch publisher and the at-once ``next_msg`` against a real JetStream: what a
batch stored, which messages the stream dropped as duplicates, what a subject no
stream takes answers, and that the commands the publisher builds are nats-py's own.
"""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError

from delivery.bus.publish import BatchPublisher, _hpub
from delivery.bus.stream import MSG_ID_HEADER, ensure_stream
from delivery.bus.subjects import Subjects


@dataclass
class Streamed:
    """A connection to a real NATS with the service's stream, and a publisher on it."""

    subjects: Subjects
    nc: Client
    js: JetStreamContext
    publisher: BatchPublisher


@pytest.fixture
async def streamed(nats_url: str, subject_prefix: str) -> AsyncIterator[Streamed]:
    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_stream(js, subjects)
    publisher = BatchPublisher(nc)
    try:
        yield Streamed(subjects, nc, js, publisher)
    finally:
        await publisher.close()
        await js.delete_stream(subjects.stream)
        await nc.close()


async def test_a_batch_is_stored_once_and_a_repeated_msg_id_is_a_duplicate(
    streamed: Streamed,
) -> None:
    subjects, js, publisher = streamed.subjects, streamed.js, streamed.publisher
    first = await publisher.publish(
        (subjects.fire_created, f"m{i}".encode(), {MSG_ID_HEADER: f"id{i}"}) for i in range(5)
    )
    assert [await f for f in first] == [False] * 5
    # Ids 3 and 4 again (a relay that crashed before stamping), then two new ones.
    again = await publisher.publish(
        (subjects.fire_created, f"m{i}".encode(), {MSG_ID_HEADER: f"id{i}"}) for i in range(3, 7)
    )
    assert [await f for f in again] == [True, True, False, False]
    sub = await js.pull_subscribe(subjects.fire_created, durable="publish_check")
    got = await sub.fetch(10, timeout=2)
    assert [m.data for m in got] == [f"m{i}".encode() for i in range(7)]
    assert [m.headers[MSG_ID_HEADER] for m in got if m.headers] == [f"id{i}" for i in range(7)]
    assert sub._sub.pending_bytes == 0
    assert sub._sub.pending_msgs == 0
    assert publisher._futures == {}


async def test_a_subject_without_a_stream_fails_its_future(
    nats_url: str, subject_prefix: str
) -> None:
    nc = await nats.connect(nats_url)
    publisher = BatchPublisher(nc)
    try:
        (future,) = await publisher.publish(
            [(f"{subject_prefix}.nowhere", b"x", {MSG_ID_HEADER: "lost"})]
        )
        with pytest.raises(NoStreamResponseError):
            await asyncio.wait_for(future, 5)
    finally:
        await publisher.close()
        await nc.close()


async def test_close_cancels_the_waiting_futures_unsubscribes_and_refuses_more(
    streamed: Streamed,
) -> None:
    """
    Closing gives up the batch still waiting (its caller returns at once, the rows stay
    unsent), drops the reply inbox from the connection, and is idempotent.
    """
    subjects, nc, publisher = streamed.subjects, streamed.nc, streamed.publisher
    subscriptions = len(nc._subs)
    waiting = await publisher.publish([(subjects.fire_created, b"x", {MSG_ID_HEADER: "closing"})])
    assert len(nc._subs) == subscriptions + 1
    # No await in between: the ack cannot have been read yet.
    await publisher.close()
    assert publisher.closed
    assert all(f.cancelled() for f in waiting)
    assert publisher._futures == {}
    assert len(nc._subs) == subscriptions
    await publisher.close()
    with pytest.raises(RuntimeError):
        await publisher.publish([(subjects.fire_created, b"y", {MSG_ID_HEADER: "late"})])


async def test_close_after_the_connection_closed_is_quiet(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    publisher = BatchPublisher(nc)
    await publisher.publish([("nowhere.at.all", b"x", {MSG_ID_HEADER: "gone"})])
    await nc.close()
    await publisher.close()
    assert publisher.closed


async def test_a_built_command_is_the_one_nats_py_writes(nats_url: str) -> None:
    """
    The batch's commands are built by the publisher: each is byte for byte what
    nats-py's ``publish`` queues for the same message; a message it would rewrite or
    refuse (a header value with a space or a line break, a name with a space) is left
    to ``publish``.
    """
    nc = await nats.connect(nats_url)
    try:
        headers = {MSG_ID_HEADER: "msg_0123", "traceparent": "00-ab-cd-01"}
        # publish queues its command without yielding: the last pending one is it.
        await nc.publish("a.subject", b'{"x":1}', reply="_INBOX.r.7", headers=headers)
        assert _hpub("a.subject", "_INBOX.r.7", b'{"x":1}', headers) == nc._pending[-1]
        await nc.publish("a.subject", b"", reply="_INBOX.r.8", headers={MSG_ID_HEADER: "e"})
        assert _hpub("a.subject", "_INBOX.r.8", b"", {MSG_ID_HEADER: "e"}) == nc._pending[-1]
        assert _hpub("a.subject", "r", b"x", {MSG_ID_HEADER: "a b"}) is None
        assert _hpub("a.subject", "r", b"x", {MSG_ID_HEADER: "a\r\nPUB x 0"}) is None
        assert _hpub("a.subject", "r", b"x", {"Bad Name": "v"}) is None
        assert _hpub("a subject", "r", b"x", {MSG_ID_HEADER: "v"}) is None
    finally:
        await nc.close()


async def test_a_message_left_to_nats_py_keeps_its_place_in_the_batch(
    streamed: Streamed,
) -> None:
    """Built commands and a message ``publish`` sends itself are stored in batch order."""
    subjects, js, publisher = streamed.subjects, streamed.js, streamed.publisher
    batch = [
        (subjects.fire_created, b"m0", {MSG_ID_HEADER: "k0"}),
        (subjects.fire_created, b"m1", {MSG_ID_HEADER: "k1", "X-Note": "two words"}),
        (subjects.fire_created, b"m2", {MSG_ID_HEADER: "k2"}),
    ]
    futures = await publisher.publish(batch)
    assert [await f for f in futures] == [False] * 3
    sub = await js.pull_subscribe(subjects.fire_created, durable="order_check")
    got = await sub.fetch(3, timeout=2)
    assert [m.data for m in got] == [b"m0", b"m1", b"m2"]
    assert [m.headers for m in got] == [
        {MSG_ID_HEADER: "k0"},
        {MSG_ID_HEADER: "k1", "X-Note": "two words"},
        {MSG_ID_HEADER: "k2"},
    ]
