"""
The timeline and its explanation when the webhook receiver fails: a wakeup made
through the API, fired by advance-time, sent by the worker to a real receiver that
answers 500 (then 410), on SQLite and PostgreSQL.
"""

from datetime import timedelta
from typing import Any

from delivery.bus.messages import NotificationCreated
from tests.handlers.webhooks.stub import Reply
from tests.webhooks.conftest import Rig
from tests.webhooks.helpers import EVENT

A, U = "agent-1", "user-1"
TIMELINE = f"/api/v1/agents/{A}/users/{U}/timeline"


async def fired_wakeup(rig: Rig) -> NotificationCreated:
    """A wakeup due in an hour, fired by advancing the pair's clock two hours."""
    response = await rig.api.post(
        f"/api/v1/agents/{A}/wakeups",
        json={"user_id": U, "check_type": "check_in", "intent": "say hi", "delay_hours": 1},
    )
    assert response.status_code == 201, response.text
    advanced = await rig.api.post(
        "/api/v1/workbench/advance-time",
        json={"agent_id": A, "user_id": U, "simulated_hours": 2},
    )
    assert advanced.status_code == 200, advanced.text
    # The worker runs after the simulated fire, as it would in real time.
    rig.clock.advance(timedelta(hours=2))
    queue = await rig.api.get(f"/api/v1/agents/{A}/notifications", params={"user_id": U})
    (message,) = queue.json()["notifications"]
    return NotificationCreated(
        notification_id=message["message_id"],
        project_id=rig.projects["alpha"],
        agent_id=A,
        user_id=U,
        event_type=EVENT,
    )


async def timeline(rig: Rig) -> list[dict[str, Any]]:
    response = await rig.api.get(TIMELINE, params={"limit": "500"})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


async def explain(rig: Rig) -> dict[str, Any]:
    events = await timeline(rig)
    composed = next(e for e in events if e["kind"] == "notification.composed")
    response = await rig.api.get(
        f"{TIMELINE}/explain", params={"at": composed["detail"]["fire_at"]}
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_a_failing_webhook_is_on_the_timeline_and_explained(rig: Rig) -> None:
    """Each attempt shows endpoint, status, latency and next retry; explain names the 500."""
    _receiver, url = rig.receiver(Reply(500, b"boom"))
    await rig.register(url)
    created = await fired_wakeup(rig)
    worker = rig.worker()
    assert await worker.enqueue([created]) == 1
    assert (await worker.sweep()).retried == 1

    events = await timeline(rig)
    assert [e["kind"] for e in events] == [
        "wakeup.accepted",
        "notification.composed",
        "webhook.attempt",
    ]
    attempt = events[-1]
    assert attempt["detail"]["endpoint"] == url
    assert attempt["detail"]["response_code"] == 500
    assert attempt["detail"]["status"] == "failed"
    assert attempt["detail"]["latency_ms"] >= 0
    assert "next_retry_at" in attempt["detail"]
    assert "HTTP 500" in attempt["summary"]
    # No schedule: local times are UTC, and the answer says so.
    assert attempt["timezone_source"] == "utc"

    answer = await explain(rig)
    assert answer["code"] == "webhook_failing"
    assert answer["message_id"] == created.notification_id
    assert "the webhook is failing" in answer["sentence"]
    assert "got HTTP 500" in answer["sentence"]
    assert "the next retry is at" in answer["sentence"]


async def test_a_gone_receiver_dead_letters_and_disables_the_endpoint(rig: Rig) -> None:
    """410 Gone: the timeline shows the dead letter and the disabled endpoint."""
    _receiver, url = rig.receiver(Reply(410, b"gone"))
    await rig.register(url)
    created = await fired_wakeup(rig)
    worker = rig.worker()
    assert await worker.enqueue([created]) == 1
    await worker.sweep()

    kinds = [e["kind"] for e in await timeline(rig)]
    assert "webhook.dead_lettered" in kinds
    assert "webhook_endpoint.disabled" in kinds
    assert kinds.index("webhook.attempt") < kinds.index("webhook.dead_lettered")

    answer = await explain(rig)
    assert answer["code"] == "webhook_failing"
    assert "dead-lettered: no more retries" in answer["sentence"]


async def test_a_2xx_is_delivered_by_webhook(rig: Rig) -> None:
    """A 2xx consumes the message: the timeline and the answer say it was the webhook."""
    _receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    created = await fired_wakeup(rig)
    worker = rig.worker()
    assert await worker.enqueue([created]) == 1
    assert (await worker.sweep()).delivered == 1

    consumed = [e for e in await timeline(rig) if e["kind"] == "notification.consumed"]
    assert [e["detail"]["by"] for e in consumed] == ["webhook"]
    answer = await explain(rig)
    assert (answer["code"], answer["got_message"]) == ("delivered", True)
    assert "a webhook answered 2xx" in answer["sentence"]
