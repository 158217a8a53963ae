"""
The shared batch consumer against a real JetStream: a batch fetched in a pull window is
handed to the handler even when the window ends with nats-py's bare timeout, and a
batch acked in one write is acked for JetStream.
"""

import asyncio
from typing import Any

import nats
import nats.errors
import pytest
from faststream.nats import NatsBroker
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js.api import ConsumerConfig
from nats.js.client import JetStreamContext

from delivery.bus import consumers
from delivery.bus.stream import ensure_stream
from delivery.bus.subjects import Subjects


async def test_messages_fetched_before_a_bare_timeout_reach_the_handler_at_once(
    nats_url: str, subject_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    FastStream's pull loop fetches again after a partial batch; when nats-py ends that
    second fetch with a bare ``asyncio.TimeoutError`` (its window ran out between
    its two pull requests), the first fetch's messages must still be handled now,
    not redelivered after ``ack_wait`` (30 s here; the test waits 5).
    """
    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_stream(js, subjects)
    calls = 0
    real = consumers._nats_fetch

    async def second_fetch_times_out_bare(
        self: JetStreamContext.PullSubscription, *args: Any, **kwargs: Any
    ) -> list[Msg]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TimeoutError  # what nats-py raises there: not its own subclass
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(consumers, "_nats_fetch", second_fetch_times_out_bare)
    handled: list[bytes] = []
    arrived = asyncio.Event()

    async def handler(raws: Any) -> None:
        for raw in raws:
            handled.append(raw.data)
            await raw.ack()
        arrived.set()

    broker = NatsBroker(nats_url, logger=None)
    consumers.subscribe_batches(
        broker,
        subject=subjects.fire_created,
        stream=subjects.stream,
        durable="bare_timeout",
        batch=10,
        ack_wait_s=30,
        pull_wait_s=1.0,
        handler=handler,
    )
    try:
        for i in range(3):  # a partial batch: the loop fetches a second time
            await js.publish(subjects.fire_created, f"m{i}".encode())
        await broker.start()
        await asyncio.wait_for(arrived.wait(), 5)
        assert sorted(handled) == [b"m0", b"m1", b"m2"]
        assert calls >= 2
    finally:
        await broker.stop()
        await js.delete_stream(subjects.stream)
        await nc.close()


def test_the_fetch_wrapper_is_installed_once_and_keeps_nats_timeouts() -> None:
    """Importing the module installs the wrapper; calling it again does not stack another."""
    installed = JetStreamContext.PullSubscription.fetch
    assert getattr(installed, "_normalised", False)
    consumers.normalise_fetch_timeouts()
    assert JetStreamContext.PullSubscription.fetch is installed
    assert issubclass(nats.errors.TimeoutError, TimeoutError)


async def test_a_batch_acked_in_one_write_is_acked_for_jetstream(
    nats_url: str, subject_prefix: str
) -> None:
    """
    ``ack_all`` writes the batch's acks at once: JetStream counts every message acked
    (nothing pending, the ack floor at the last one) and redelivers none after
    ``ack_wait``; acking the batch again raises before anything is sent, as ``ack``
    does.
    """
    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_stream(js, subjects)
    try:
        for i in range(5):
            await js.publish(subjects.fire_created, f"m{i}".encode())
        sub = await js.pull_subscribe(
            subjects.fire_created,
            durable="ack_all",
            stream=subjects.stream,
            config=ConsumerConfig(ack_wait=1.0),
        )
        batch = await sub.fetch(5, timeout=5)
        assert [m.data for m in batch] == [f"m{i}".encode() for i in range(5)]
        await consumers.ack_all(batch)
        await nc.flush()
        # The server applies acks to the consumer on its own time: wait for them.
        for _ in range(50):
            info = await js.consumer_info(subjects.stream, "ack_all")
            if info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
        assert info.num_ack_pending == 0
        assert info.ack_floor is not None
        assert info.ack_floor.stream_seq == 5
        await asyncio.sleep(1.5)  # past ack_wait: an unacked message would be back
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=0.5)
        with pytest.raises(MsgAlreadyAckdError):
            await consumers.ack_all(batch)
    finally:
        await js.delete_stream(subjects.stream)
        await nc.close()
