"""
Webhook recovery: re-send one delivery and recover an endpoint's messages since an
instant, through the API and the durable queue the worker sweeps, on SQLite and
PostgreSQL. Both are idempotent: a repeated call never queues a message twice.
"""

from datetime import timedelta

from sqlalchemy import select, update

from delivery.store.tables import DELIVERIES, NOTIFICATIONS
from handlers.retry import MAX_ATTEMPTS
from tests.handlers.webhooks.stub import Reply
from tests.webhooks.conftest import Rig
from tests.webhooks.helpers import EVENT

BASE = f"/api/v1/webhooks/{EVENT}"


async def _exhaust(rig: Rig, notification_id: str) -> None:
    """Make the notification's delivery dead after every attempt of its schedule."""
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.notification_id == notification_id)
            .values(status="dead", attempt_count=MAX_ATTEMPTS, next_attempt_at=None)
        )


async def _delivery(rig: Rig, notification_id: str) -> dict[str, object]:
    async with rig.engine.connect() as conn:
        row = (
            (
                await conn.execute(
                    select(DELIVERIES).where(DELIVERIES.c.notification_id == notification_id)
                )
            )
            .mappings()
            .one()
        )
    return dict(row)


async def test_resend_a_delivered_message_by_attempt_id(rig: Rig) -> None:
    """A delivered (so consumed) message is sent again once, recorded as attempt 2."""
    receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await worker.enqueue([created])
    assert (await worker.sweep()).delivered == 1
    (first,) = await rig.attempts()

    answer = await rig.api.post(f"{BASE}/resend/{first['attempt_id']}")
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["queued"] is True
    assert body["event_id"] == created.notification_id
    again = await rig.api.post(f"{BASE}/resend/{created.notification_id}")
    assert again.status_code == 202
    assert again.json() == body | {"queued": False}  # still pending: not queued twice

    result = await worker.sweep()
    assert result.delivered == 1
    assert (await worker.sweep()).claimed == 0
    assert len(receiver.requests) == 2
    assert {r.headers["webhook-id"] for r in receiver.requests} == {created.notification_id}
    attempts = await rig.attempts()
    assert [(a["attempt_number"], a["status"]) for a in attempts] == [
        (2, "success"),
        (1, "success"),
    ]
    assert (await _delivery(rig, created.notification_id))["status"] == "delivered"


async def test_resend_restarts_the_retry_schedule(rig: Rig) -> None:
    """A re-sent delivery that had used every attempt is retried again, not dead at once."""
    _receiver, url = rig.receiver(Reply(500))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await worker.enqueue([created])
    await _exhaust(rig, created.notification_id)

    answer = await rig.api.post(f"{BASE}/resend/{created.notification_id}")
    assert answer.status_code == 202, answer.text
    result = await worker.sweep()
    assert (result.retried, result.dead) == (1, 0)
    delivery = await _delivery(rig, created.notification_id)
    assert delivery["status"] == "pending"
    assert delivery["attempt_count"] == MAX_ATTEMPTS + 1
    (attempt,) = await rig.attempts()
    assert attempt["attempt_number"] == MAX_ATTEMPTS + 1


async def test_recover_since_requeues_failed_and_missing_once(rig: Rig) -> None:
    """
    Dead deliveries since the instant restart, messages the endpoint never had are
    queued, older, consumed and delivered ones are left alone; a repeat queues nothing.
    """
    receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    worker = rig.worker()
    old, dead, done, consumed = await rig.notify(1, 2, 3, 4)
    await worker.enqueue([old, dead, done, consumed])
    await _exhaust(rig, old.notification_id)
    await _exhaust(rig, dead.notification_id)
    await _exhaust(rig, consumed.notification_id)
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id == consumed.notification_id)
            .values(status="consumed", consumed_at=rig.clock.now())
        )
    assert (await worker.sweep()).delivered == 1  # ``done``
    (missing,) = await rig.notify(5)  # never enqueued: as if the endpoint was disabled
    rig.clock.advance(timedelta(seconds=10))  # every message is in the past

    since = (rig.start + timedelta(seconds=2)).isoformat()
    answer = await rig.api.post(f"{BASE}/recover", json={"since": since})
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"success": True, "requeued": 1, "created": 1}
    repeat = await rig.api.post(f"{BASE}/recover", json={"since": since})
    assert repeat.json() == {"success": True, "requeued": 0, "created": 0}

    assert (await worker.sweep()).delivered == 2
    sent = [r.headers["webhook-id"] for r in receiver.requests]
    assert sorted(sent) == sorted(
        [done.notification_id, dead.notification_id, missing.notification_id]
    )
    after = await rig.api.post(f"{BASE}/recover", json={"since": since})
    assert after.json() == {"success": True, "requeued": 0, "created": 0}
    assert (await _delivery(rig, old.notification_id))["status"] == "dead"


async def test_recovery_refusals(rig: Rig) -> None:
    """Bad input is 400 naming the field, unknown ids and other projects' ids 404."""
    _receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    (created,) = await rig.notify(1)
    await rig.worker().enqueue([created])

    for since, word in (("yesterday", "since"), ("2199-01-01T00:00:00Z", "future")):
        bad = await rig.api.post(f"{BASE}/recover", json={"since": since})
        assert bad.status_code == 400, bad.text
        assert word in bad.json()["message"]
        assert bad.json()["errors"][0]["field"] == "since"
    missing = await rig.api.post(f"{BASE}/recover", json={})
    assert missing.status_code == 400
    unknown_type = await rig.api.post(
        "/api/v1/webhooks/on_nothing/recover", json={"since": rig.start.isoformat()}
    )
    assert unknown_type.status_code == 404
    assert unknown_type.json()["code"] == "NOT_FOUND"
    unknown = await rig.api.post(f"{BASE}/resend/whd_nope")
    assert unknown.status_code == 404

    beta_key = await rig.key_for("beta")
    beta = {"Authorization": f"Bearer {beta_key}"}
    await rig.api.put(f"/api/v1/webhooks/{EVENT}", json={"webhook_url": url}, headers=beta)
    foreign = await rig.api.post(f"{BASE}/resend/{created.notification_id}", headers=beta)
    assert foreign.status_code == 404
    assert foreign.json()["message"] == unknown.json()["message"].replace(
        "whd_nope", created.notification_id
    )
    other_path = await rig.api.post(
        f"/api/v1/projects/{rig.projects['beta']}/webhooks/{EVENT}/resend/{created.notification_id}"
    )
    assert other_path.status_code == 404
    assert (await _delivery(rig, created.notification_id))["force_send"] is False


async def test_recover_a_disabled_endpoint_is_409(rig: Rig) -> None:
    """A disabled endpoint is refused with a state error; registering again allows it."""
    _receiver, url = rig.receiver(Reply(410))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await worker.enqueue([created])
    assert (await worker.sweep()).dead == 1
    refused = await rig.api.post(f"{BASE}/recover", json={"since": rig.start.isoformat()})
    assert refused.status_code == 409
    assert refused.json()["code"] == "INVALID_STATE"
    await rig.register(url)
    allowed = await rig.api.post(f"{BASE}/recover", json={"since": rig.start.isoformat()})
    assert allowed.json()["requeued"] == 1


async def test_resend_with_an_idempotency_key_replays(rig: Rig) -> None:
    """The same Idempotency-Key after the re-send completed replays, queuing nothing."""
    receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await worker.enqueue([created])
    await worker.sweep()
    headers = {"Idempotency-Key": "resend-1"}
    first = await rig.api.post(f"{BASE}/resend/{created.notification_id}", headers=headers)
    assert first.json()["queued"] is True
    await worker.sweep()
    second = await rig.api.post(f"{BASE}/resend/{created.notification_id}", headers=headers)
    assert second.json() == first.json()
    assert (await worker.sweep()).claimed == 0
    assert len(receiver.requests) == 2


async def test_a_message_a_policy_held_back_is_not_resent(rig: Rig) -> None:
    """A suppressed message never had a delivery; asking to resend it says why, queues none."""
    _receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    (created,) = await rig.notify(1)
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id == created.notification_id)
            .values(status="suppressed", status_reason="attention_budget")
        )

    answer = await rig.api.post(f"{BASE}/resend/{created.notification_id}")

    assert answer.status_code == 409, answer.text
    assert "suppressed" in answer.json()["message"]
    async with rig.engine.connect() as conn:
        found = (
            await conn.execute(
                select(DELIVERIES.c.id).where(
                    DELIVERIES.c.notification_id == created.notification_id
                )
            )
        ).all()
    assert found == []


async def test_resend_of_a_message_past_its_deadline_is_refused(rig: Rig) -> None:
    """
    A message past its deadline is never sent again: its re-send is 409 and queues
    nothing, whether it had a delivery already or not, before and after the sweep
    marks it expired.
    """
    _receiver, url = rig.receiver(Reply(500))
    await rig.register(url)
    worker = rig.worker()
    sent, never = await rig.notify(1, 2)
    await worker.enqueue([sent])
    await _exhaust(rig, sent.notification_id)
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id.in_([sent.notification_id, never.notification_id]))
            .values(expires_at=rig.clock.now() - timedelta(seconds=1))
        )
    for note in (sent, never):
        answer = await rig.api.post(f"{BASE}/resend/{note.notification_id}")
        assert answer.status_code == 409, answer.text
        assert answer.json()["code"] == "INVALID_STATE"
        assert "expired" in answer.json()["message"]
    assert (await _delivery(rig, sent.notification_id))["status"] == "dead"
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id == sent.notification_id)
            .values(status="expired")
        )
    answer = await rig.api.post(f"{BASE}/resend/{sent.notification_id}")
    assert answer.status_code == 409, answer.text
    async with rig.engine.connect() as conn:
        count = (
            await conn.execute(
                select(DELIVERIES.c.id).where(DELIVERIES.c.notification_id == never.notification_id)
            )
        ).all()
    assert count == []


async def test_recover_leaves_out_messages_past_their_deadline(rig: Rig) -> None:
    """A dead delivery and a message never sent, both past their deadline: none queued."""
    _receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    worker = rig.worker()
    dead, never = await rig.notify(1, 2)
    await worker.enqueue([dead])
    await _exhaust(rig, dead.notification_id)
    rig.clock.advance(timedelta(seconds=10))
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id.in_([dead.notification_id, never.notification_id]))
            .values(expires_at=rig.clock.now() - timedelta(seconds=1))
        )

    answer = await rig.api.post(f"{BASE}/recover", json={"since": rig.start.isoformat()})

    assert answer.json() == {"success": True, "requeued": 0, "created": 0}
    assert (await _delivery(rig, dead.notification_id))["status"] == "dead"
