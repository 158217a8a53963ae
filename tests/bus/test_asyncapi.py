"""The AsyncAPI document matches the code, and real notifications match its webhook payload."""

import json
from pathlib import Path

from sqlalchemy import select

from delivery.bus.asyncapi import asyncapi_document, render
from delivery.bus.messages import NotificationEvent
from delivery.store.tables import NOTIFICATIONS
from tests.api.conftest import Api

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_document_is_the_generated_one() -> None:
    """Regenerate with `python -m delivery.bus.asyncapi > deploy/asyncapi.json`."""
    assert (ROOT / "deploy" / "asyncapi.json").read_text() == render()


def test_every_subject_and_the_webhook_are_described() -> None:
    document = asyncapi_document("acme")
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {
        "acme.fire.created",
        "acme.wakeup.due",
        "acme.event.accepted",
        "acme.notification.created",
        "{webhook_url}",
    }
    for operation in document["operations"].values():
        ref = operation["channel"]["$ref"].rsplit("/", 1)[-1]
        assert ref in document["channels"]


async def test_stored_webhook_bodies_match_the_payload_model(api: Api) -> None:
    """Notifications made from a schedule and a wakeup carry exactly NotificationEvent."""
    base = "/api/v1/agents/a1"
    schedule = {
        "cadence": {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "Asia/Tokyo"},
        "intent": "check in",
        "check_type": "reminder",
        "metadata": {"course": "7-day"},
    }
    assert (await api.alpha.post(f"{base}/users/u1/schedules", json=schedule)).status_code == 201
    wakeup = {"user_id": "u1", "check_type": "follow_up", "intent": "ask", "delay_hours": 1}
    assert (await api.alpha.post(f"{base}/wakeups", json=wakeup)).status_code in (200, 201)
    advanced = await api.alpha.post(
        "/api/v1/workbench/advance-time",
        json={"agent_id": "a1", "user_id": "u1", "simulated_hours": 48},
    )
    assert advanced.status_code == 200, advanced.text
    async with api.store.read() as conn:
        bodies = (await conn.execute(select(NOTIFICATIONS.c.payload_json))).scalars().all()
    assert len(bodies) >= 3
    kinds = set()
    for body in bodies:
        event = NotificationEvent.model_validate(json.loads(body))
        kinds.add(event.source_type)
    assert kinds == {"schedule", "wakeup"}
