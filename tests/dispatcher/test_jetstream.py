"""
The dispatcher against a real JetStream server, on both databases: redelivery and acks.

Messages are published straight to the stream (the outbox relay has its own tests);
each test has its own subject prefix, hence its own stream and durable consumers.
"""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats
import pytest
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from delivery.bus.messages import EventAccepted, FireCreated, NotificationCreated, WakeupDue
from delivery.bus.stream import ensure_stream
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.app import DURABLES, Dispatcher
from delivery.dispatcher.process import BatchResult
from delivery.domain import SourceKind, SourceRef, notification_id
from delivery.outbox import OutboxRelay
from delivery.settings import Settings
from delivery.store.tables import NotificationRow, WakeupRow
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 1, 0, 5, tzinfo=UTC)
FIRE_AT = datetime(2026, 5, 2, 1, 0, tzinfo=UTC)


@pytest.fixture
async def js(nats_url: str, subject_prefix: str) -> AsyncIterator[JetStreamContext]:
    """A JetStream context with this test's stream created; the stream is deleted after."""
    nc = await nats.connect(nats_url)
    context = nc.jetstream()
    subjects = Subjects(subject_prefix)
    await ensure_stream(context, subjects)
    try:
        yield context
    finally:
        await context.delete_stream(subjects.stream)
        await nc.close()


@pytest.fixture
async def dispatcher(
    engine: AsyncEngine, nats_url: str, subject_prefix: str
) -> AsyncIterator[Dispatcher]:
    """A dispatcher with the template composer and a manual clock; stopped at teardown."""
    settings = Settings(subject_prefix=subject_prefix)
    d = Dispatcher(settings, engine, nats_url=nats_url, clock=ManualClock(NOW))
    try:
        yield d
    finally:
        await d.stop()


async def publish(js: JetStreamContext, subject: str, body: bytes, msg_id: str) -> None:
    await js.publish(subject, body, headers={"Nats-Msg-Id": msg_id})


async def seed_sources(engine: AsyncEngine) -> str:
    await rows.project(engine)
    await rows.schedule(engine)
    await rows.wakeup(engine, "wk_live")
    await rows.wakeup(engine, "wk_cancelled", status="cancelled", cancelled_at=NOW)
    await rows.event(engine)
    return await rows.fire(engine, "sch_1", FIRE_AT)


async def publish_sources(js: JetStreamContext, subjects: Subjects, fid: str) -> None:
    fire = FireCreated(fire_id=fid, schedule_id="sch_1", fire_at=FIRE_AT).model_dump_json()
    # The same fire twice under two message ids: JetStream stores and delivers both,
    # exactly what an outbox replay after the dedupe window would produce.
    await publish(js, subjects.fire_created, fire.encode(), fid)
    await publish(js, subjects.fire_created, fire.encode(), fid + "-replay")
    for wid in ("wk_live", "wk_cancelled"):
        body = WakeupDue(wakeup_id=wid, fire_at=FIRE_AT).model_dump_json().encode()
        await publish(js, subjects.wakeup_due, body, wid)
    body = EventAccepted(event_id="evt_1").model_dump_json().encode()
    await publish(js, subjects.event_accepted, body, "evt_1")


async def assert_all_acked(js: JetStreamContext, subjects: Subjects) -> None:
    for durable in DURABLES.values():
        info = await js.consumer_info(subjects.stream, durable)
        assert (info.num_pending, info.num_ack_pending) == (0, 0), durable


async def test_drain_makes_one_notification_per_source(
    engine: AsyncEngine, js: JetStreamContext, dispatcher: Dispatcher
) -> None:
    """A fire delivered twice, a live and a cancelled wakeup, an event: three notifications."""
    subjects = dispatcher.subjects
    fid = await seed_sources(engine)
    await publish_sources(js, subjects, fid)

    result = await dispatcher.drain(idle_s=0.2)

    assert sorted(result.created) == sorted(notification_id(s) for s in (fid, "wk_live", "evt_1"))
    assert result.duplicates == [fid]
    assert result.skipped == {"wk_cancelled": "wakeup cancelled"}
    assert await rows.count(engine, NotificationRow) == 3
    assert len(await rows.outbox(engine)) == 3
    assert (await rows.row(engine, WakeupRow, "wk_cancelled"))["status"] == "cancelled"
    await assert_all_acked(js, subjects)


async def test_redelivery_after_commit_is_absorbed(
    engine: AsyncEngine, js: JetStreamContext, dispatcher: Dispatcher
) -> None:
    """
    Committed but never acked (a crash), the message comes back, changes nothing,
    and is logged as a redelivery.
    """
    subjects = dispatcher.subjects
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await rows.fire(engine, "sch_1", FIRE_AT)
    body = FireCreated(fire_id=fid, schedule_id="sch_1", fire_at=FIRE_AT).model_dump_json()
    await publish(js, subjects.fire_created, body.encode(), fid)
    sub = await js.pull_subscribe(
        subjects.fire_created, durable=DURABLES[SourceKind.SCHEDULE], stream=subjects.stream
    )
    [msg] = await sub.fetch(1, timeout=5)
    first = await dispatcher.processor.process([SourceRef(SourceKind.SCHEDULE, fid)])
    await msg.nak()  # the process "dies" after its commit, before its ack
    await sub.unsubscribe()

    with capture_logs() as logs:
        second = await dispatcher.drain(idle_s=0.2)

    assert first.created == [notification_id(fid)]
    assert second.created == []
    assert second.duplicates == [fid]
    # An operator sees the redelivery (late by ack_wait after a real crash).
    redelivered = [e for e in logs if e["event"] == "dispatch.redelivered"]
    assert [(e["log_level"], e["kind"], e["messages"]) for e in redelivered] == [
        ("warning", "schedule", 1)
    ]
    assert await rows.count(engine, NotificationRow) == 1
    await assert_all_acked(js, subjects)


async def test_undecodable_message_is_terminated(
    engine: AsyncEngine, js: JetStreamContext, dispatcher: Dispatcher
) -> None:
    """A body that is not the subject's payload is terminated, not redelivered forever."""
    subjects = dispatcher.subjects
    await publish(js, subjects.fire_created, b"not json", "junk")

    result = await dispatcher.drain(idle_s=0.2)

    assert (result.created, result.skipped) == ([], {})
    await assert_all_acked(js, subjects)


async def test_running_consumers_process_and_ack(
    engine: AsyncEngine, js: JetStreamContext, nats_url: str, subject_prefix: str
) -> None:
    """Started, the FastStream batch consumers make the notifications and ack every message."""
    created: list[str] = []
    three = asyncio.Event()

    def on_batch(result: BatchResult) -> None:
        created.extend(result.created)
        if len(created) >= 3:
            three.set()

    settings = Settings(subject_prefix=subject_prefix)
    dispatcher = Dispatcher(
        settings, engine, nats_url=nats_url, clock=ManualClock(NOW), on_batch=on_batch
    )
    subjects = dispatcher.subjects
    fid = await seed_sources(engine)
    await dispatcher.start()
    try:
        # A poison message first: terminated, and the consumer carries on.
        await js.publish(
            subjects.fire_created, b"{broken", headers={"content-type": "application/json"}
        )
        await publish_sources(js, subjects, fid)
        # Generous: on a loaded 2-core box a consumer can take seconds to attach.
        await asyncio.wait_for(three.wait(), timeout=45)
    finally:
        await dispatcher.stop()

    assert await rows.count(engine, NotificationRow) == 3
    assert (await rows.row(engine, WakeupRow, "wk_live"))["status"] == "executed"
    await assert_all_acked(js, subjects)


async def test_notification_created_reaches_the_stream_once(
    engine: AsyncEngine, js: JetStreamContext, dispatcher: Dispatcher
) -> None:
    """Dispatch, relay, redeliver, relay again: handlers see one notification.created."""
    subjects = dispatcher.subjects
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await rows.fire(engine, "sch_1", FIRE_AT)
    body = FireCreated(fire_id=fid, schedule_id="sch_1", fire_at=FIRE_AT).model_dump_json()
    relay = OutboxRelay(engine, js, ManualClock(NOW))

    await publish(js, subjects.fire_created, body.encode(), fid)
    await dispatcher.drain(idle_s=0.2)
    await relay.drain()
    await publish(js, subjects.fire_created, body.encode(), fid + "-again")
    again = await dispatcher.drain(idle_s=0.2)
    await relay.drain()

    assert again.duplicates == [fid]
    info = await js.stream_info(subjects.stream, subjects_filter=subjects.notification_created)
    assert info.state.subjects == {subjects.notification_created: 1}
    message = await js.get_last_msg(subjects.stream, subjects.notification_created)
    assert message.headers is not None
    assert message.headers["Nats-Msg-Id"] == notification_id(fid)
    assert NotificationCreated.model_validate_json(message.data or b"").notification_id == (
        notification_id(fid)
    )
