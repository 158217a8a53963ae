"""
Proactive events reach the project notification channels subscribed to them, through
the channels worker (the durable JetStream consumer of ``notification.created``), on
SQLite and PostgreSQL: a real webhook receiver and a real SMTP server receive them,
every send is an attempt listed under ``/api/v1/channels/{id}/attempts``, a transient
failure is retried from the database, a redelivery sends nothing twice, and
``deliver`` records its sends too.
"""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.messages import NotificationCreated
from delivery.bus.stream import ensure_stream
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from handlers.channels_worker import ChannelsWorker, FanoutResult
from handlers.webhooks.signing import verify_sonzai
from tests.api.notes import add_notifications, notification
from tests.channels.conftest import START, Api, channel_settings
from tests.channels.receivers import WebhookReceiver, smtp_server, wait_for
from tests.fixtures.http import ServeApp

A, U = "agent_abc", "user_123"


def wakeup_note(project_id: str, n: int) -> dict[str, Any]:
    """A pending ``on_wakeup_ready`` notification as the dispatcher writes it."""
    row = notification(
        project_id, A, U, n, START, source_type="wakeup", event_type="on_wakeup_ready"
    )
    row["check_type"] = "check_in"
    row["generated_message"] = "Hi! How did the interview go?"
    row["payload_json"] = json.dumps(
        {
            "event_id": f"evt_{row['id']}",
            "event_type": "on_wakeup_ready",
            "agent_id": A,
            "user_id": U,
            "message_id": row["id"],
            "check_type": "check_in",
            "generated_message": row["generated_message"],
        }
    )
    return row


async def create_channel(api: Api, **body: Any) -> dict[str, Any]:
    response = await api.alpha.post("/api/v1/channels", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def attempts(api: Api, channel_id: str) -> list[dict[str, Any]]:
    response = await api.alpha.get(f"/api/v1/channels/{channel_id}/attempts")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["attempts"]
    return found


def worker_for(
    tmp_path: Path, clock: ManualClock, engine: AsyncEngine, **kw: Any
) -> ChannelsWorker:
    # The API's data folder: the worker opens the channels' sealed secrets with its key.
    settings = channel_settings(tmp_path, **kw.pop("settings", {}))
    return ChannelsWorker(settings, engine, clock=clock, rand=lambda: 0.5, **kw)


async def test_a_wakeup_reaches_the_subscribed_channels_over_jetstream(
    api: Api, engine: AsyncEngine, tmp_path: Path, http_server: ServeApp, nats_url: str
) -> None:
    """
    ``notification.created`` on JetStream: the channels subscribed to ``on_wakeup_ready``
    (a webhook, signed with the channel's secret, and an email) get it once; one
    subscribed to another event type does not; each send is listed as an attempt.
    """
    receiver, other = WebhookReceiver(), WebhookReceiver()
    hook_url, other_url = http_server(receiver.app()), http_server(other.app())
    with smtp_server() as (smtp_port, mailbox):
        hook = await create_channel(
            api, name="wakeups", type="webhook", config={"url": f"{hook_url}/in"},
            events=["on_wakeup_ready"], filter={"agents": [A]},
        )  # fmt: skip
        await create_channel(
            api, name="fires only", type="webhook", config={"url": f"{other_url}/in"},
            events=["on_recurring_event_due"],
        )  # fmt: skip
        mail = await create_channel(
            api, name="ops mail", type="email", config={"to": "ops@example.com"},
            events=["on_wakeup_ready"],
        )  # fmt: skip
        row = wakeup_note(api.projects["alpha"], 1)
        await add_notifications(engine, [row])
        results: asyncio.Queue[FanoutResult] = asyncio.Queue()
        clock = ManualClock(START)
        smtp = {"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_security": "plain",
                "smtp_from": "alerts@example.com"}  # fmt: skip
        worker = worker_for(
            tmp_path, clock, engine, settings=smtp, nats_url=nats_url,
            on_result=results.put_nowait,
        )  # fmt: skip
        await worker.start()
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            subjects = Subjects(worker.settings.subject_prefix)
            await ensure_stream(js, subjects)
            created = NotificationCreated(
                notification_id=row["id"], project_id=api.projects["alpha"], agent_id=A,
                user_id=U, event_type="on_wakeup_ready",
            )  # fmt: skip
            await js.publish(
                subjects.notification_created,
                created.model_dump_json().encode(),
                headers={"Nats-Msg-Id": row["id"]},
            )
            async with asyncio.timeout(20):
                result = await results.get()
                while result.notifications == 0:
                    result = await results.get()
        finally:
            await nc.close()
            await worker.stop()

        assert (result.sent, result.failed) == (2, 0)
        await wait_for(receiver.arrived)
        [got] = receiver.received
        body = json.loads(got.body)
        assert body["event_type"] == "on_wakeup_ready"
        assert body["payload"]["generated_message"] == "Hi! How did the interview go?"
        verify_sonzai(
            got.body,
            got.headers["sonzai-signature"],
            [hook["config"]["secret"]],
            now=datetime.now(UTC),
            tolerance=timedelta(days=3650),
        )
        assert other.received == []
        assert [e.rcpt_tos for e in mailbox.envelopes] == [["ops@example.com"]]

    [hook_attempt] = await attempts(api, hook["channel_id"])
    assert hook_attempt["notification_id"] == row["id"]
    assert (hook_attempt["kind"], hook_attempt["status"]) == ("webhook", "sent")
    assert hook_attempt["channel_id"] == hook["channel_id"]
    assert hook_attempt["response_code"] == 200
    assert hook_attempt["destination"] == "http://127.0.0.1", "no path or query in the log"
    [mail_attempt] = await attempts(api, mail["channel_id"])
    assert (mail_attempt["kind"], mail_attempt["status"]) == ("email", "sent")


async def test_redelivery_sends_nothing_twice_and_failures_are_retried(
    api: Api, engine: AsyncEngine, tmp_path: Path, http_server: ServeApp
) -> None:
    """
    A 503 is a failed attempt with a retry queued in the database; the sweep sends it
    again and records the second attempt; a redelivered message adds no send.
    """
    receiver = WebhookReceiver(status=503)
    hook = await create_channel(
        api, name="wakeups", type="webhook", config={"url": f"{http_server(receiver.app())}/in"},
        events=["on_wakeup_ready"],
    )  # fmt: skip
    row = wakeup_note(api.projects["alpha"], 2)
    await add_notifications(engine, [row])
    clock = ManualClock(START)
    worker = worker_for(tmp_path, clock, engine)
    try:
        first = await worker.fan_out([row["id"]])
        again = await worker.fan_out([row["id"]])
        [failed] = await attempts(api, hook["channel_id"])
        receiver.status = 200
        clock.advance(timedelta(minutes=1))
        swept = await worker.sweep()
        nothing = await worker.sweep()
    finally:
        await worker.stop()

    assert (first.failed, first.retries_scheduled) == (1, 1)
    assert (again.sent, again.failed) == (0, 0), "a redelivery attempts no channel twice"
    assert (failed["status"], failed["response_code"]) == ("failed", 503)
    assert "next_attempt_at" in failed
    assert swept.sent == 1
    assert nothing.sent + nothing.failed == 0
    assert len(receiver.received) == 2
    listed = await attempts(api, hook["channel_id"])
    assert [(a["attempt_number"], a["status"]) for a in listed] == [(2, "sent"), (1, "failed")]
    assert all("next_attempt_at" not in a for a in listed)


async def test_deliver_records_its_attempts(api: Api, http_server: ServeApp) -> None:
    """``deliver`` answers as before and each send is listed under its channel."""
    receiver = WebhookReceiver()
    hook = await create_channel(
        api, name="ops", type="webhook", config={"url": f"{http_server(receiver.app())}/in"},
    )  # fmt: skip
    answer = await api.alpha.post(
        "/api/v1/channels/deliver",
        json={"event_type": "lead.found", "payload": {"agent_id": A, "text": "hello"}},
    )
    assert answer.status_code == 200, answer.text
    assert [d["status"] for d in answer.json()["deliveries"]] == ["sent"]

    [attempt] = await attempts(api, hook["channel_id"])
    assert (attempt["status"], attempt["kind"], attempt["response_code"]) == (
        "sent",
        "webhook",
        200,
    )
    assert attempt["notification_id"].startswith("dlv_")
    missing = await api.alpha.get("/api/v1/channels/nch_nope/attempts")
    assert missing.status_code == 404
    assert missing.json()["code"] == "NOT_FOUND"
    foreign = await api.beta.get(f"/api/v1/channels/{hook['channel_id']}/attempts")
    assert foreign.status_code == 404
    bad = await api.alpha.get(f"/api/v1/channels/{hook['channel_id']}/attempts?limit=0")
    assert bad.status_code == 400
