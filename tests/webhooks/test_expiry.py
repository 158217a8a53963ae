"""
Freshness at the webhook and the queue, on SQLite and PostgreSQL: a message past its
deadline is never sent, retries included, even before the sweep marks it expired,
and polling neither lists nor consumes it.
"""

from datetime import timedelta

from sqlalchemy import update

from delivery.store.policy import expire_due
from delivery.store.tables import NOTIFICATIONS
from handlers.retry import SCHEDULE
from tests.handlers.webhooks.stub import Reply
from tests.webhooks.conftest import Rig


async def _deadline(rig: Rig, nid: str, seconds: float) -> None:
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id == nid)
            .values(expires_at=rig.clock.now() + timedelta(seconds=seconds))
        )


async def test_retries_stop_at_the_deadline(rig: Rig) -> None:
    """500 first; the retry falls after the deadline: skipped, never sent again."""
    receiver, url = rig.receiver(Reply(500, b"boom"), Reply(200))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await _deadline(rig, created.notification_id, SCHEDULE[1].total_seconds() / 2)
    await worker.enqueue([created])

    assert (await worker.sweep()).retried == 1
    rig.clock.advance(SCHEDULE[1])
    result = await worker.sweep()

    assert (result.skipped, result.delivered) == (1, 0)
    assert len(receiver.requests) == 1
    (delivery,) = await rig.webhooks.deliveries()
    assert delivery["status"] == "skipped"
    assert "expired" in delivery["last_error"]


async def test_an_expired_message_is_neither_listed_nor_consumed(rig: Rig) -> None:
    """Past its deadline: gone from the pending list, consume is 409, the sweep marks it."""
    first, second = await rig.notify(1, 2)
    await _deadline(rig, first.notification_id, 60)
    queue = "/api/v1/agents/agent-1/notifications"
    listed = (await rig.api.get(queue)).json()["notifications"]
    assert {n["message_id"] for n in listed} == {first.notification_id, second.notification_id}

    rig.clock.advance(timedelta(seconds=61))
    listed = (await rig.api.get(queue)).json()["notifications"]
    assert [n["message_id"] for n in listed] == [second.notification_id]
    consumed = await rig.api.post(f"{queue}/{first.notification_id}/consume")
    assert consumed.status_code == 409, consumed.text

    assert await expire_due(rig.engine, rig.clock.now()) == [first.notification_id]
    expired = (await rig.api.get(queue, params={"status": "expired"})).json()["notifications"]
    assert [n["message_id"] for n in expired] == [first.notification_id]
