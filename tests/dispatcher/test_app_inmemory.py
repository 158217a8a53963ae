"""The FastStream subscribers in memory (TestNatsBroker): decode, process, ack."""

from datetime import UTC, datetime

from faststream.nats import TestNatsBroker
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from delivery.bus.messages import EventAccepted, WakeupDue
from delivery.clock import ManualClock
from delivery.dispatcher.app import Dispatcher
from delivery.domain import notification_id
from delivery.settings import Settings
from delivery.store.tables import NotificationRow
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 1, 0, 5, tzinfo=UTC)


async def test_subscribers_route_each_subject(engine: AsyncEngine) -> None:
    """Each subject reaches its consumer; a repeated message still makes one notification."""
    await rows.project(engine)
    await rows.wakeup(engine)
    await rows.event(engine)
    settings = Settings(subject_prefix="mem")
    dispatcher = Dispatcher(settings, engine, nats_url="nats://unused:4222", clock=ManualClock(NOW))
    subjects = dispatcher.subjects
    wakeup = WakeupDue(wakeup_id="wk_1", fire_at=NOW).model_dump_json()

    with capture_logs() as logs:
        async with TestNatsBroker(dispatcher.broker) as broker:
            await broker.publish(wakeup, subjects.wakeup_due, stream=subjects.stream)
            await broker.publish(wakeup, subjects.wakeup_due, stream=subjects.stream)
            await broker.publish(
                EventAccepted(event_id="evt_1").model_dump_json(),
                subjects.event_accepted,
                stream=subjects.stream,
            )
            await dispatcher.idle()

    notes = await rows.notifications(engine)
    assert sorted(n["id"] for n in notes) == sorted(
        [notification_id("wk_1"), notification_id("evt_1")]
    )
    assert await rows.count(engine, NotificationRow) == 2
    # Every batch was settled (acked) to its end, none crashed after its commit.
    assert [line for line in logs if line["log_level"] == "error"] == []
