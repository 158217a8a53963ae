"""
The channels worker end to end, on SQLite and PostgreSQL: ``notification.created`` on
real JetStream becomes an email received by a real aiosmtpd server and requests to the
FCM and Twilio stand-ins (the channels-core engineer's, which check each request as the
providers document it); opt-out and preferences are honoured, a dead FCM token and an
unsubscribed number are disabled, a transient failure is retried from the database.
"""

import asyncio
import email
import email.policy
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery import tracing
from delivery.bus.messages import NotificationCreated
from delivery.bus.stream import ensure_stream
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store.channels import ChannelStore
from delivery.store.sql import SqlStore
from handlers.channels_worker import ChannelsWorker, FanoutResult
from tests.api.notes import add_notifications, notification
from tests.handlers.channels.conftest import ACCOUNT_SID, AUTH_TOKEN, SMS_FROM, SmtpServer
from tests.handlers.channels.standins import Canned, FcmStandIn, TwilioStandIn, twilio_error

A, U = "agent-1", "user-1"
TOKEN = "dXNlci0xLWRldmljZQ:APA91bHdeviceTokenForUser1"
ADDRESS = "ann@example.com"
NUMBER = "+14155550100"


@pytest.fixture
def worker_settings(
    tmp_path: Path,
    service_account_info: dict[str, str],
    provider_url: str,
    plain_smtp: SmtpServer,
    subject_prefix: str,
) -> Settings:
    """Every provider pointed at the local stand-ins (an operator's configuration)."""
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(service_account_info))
    return Settings(
        subject_prefix=subject_prefix,
        data_dir=tmp_path,
        nats_url="",
        fcm_service_account_file=key_file,
        fcm_base_url=provider_url,
        fcm_token_url=f"{provider_url}/token",
        smtp_host="127.0.0.1",
        smtp_port=plain_smtp.port,
        smtp_security="plain",
        smtp_from="agent@mail.example.com",
        sms_base_url=provider_url,
        sms_account_sid=ACCOUNT_SID,
        sms_auth_token=AUTH_TOKEN,
        sms_from=SMS_FROM,
    )


@pytest.fixture
async def project(engine: AsyncEngine, clock: ManualClock, worker_settings: Settings) -> str:
    """A project whose user has a token, an address, a number and an opted-out address."""
    project_id = (await SqlStore(engine).keys.ensure_project("alpha", clock.now())).id
    store = ChannelStore(engine, secrets=SecretBox.from_settings(worker_settings))
    for kind, destination, opted_out in [
        ("fcm", TOKEN, False),
        ("email", ADDRESS, False),
        ("sms", NUMBER, False),
        ("email", "quiet@example.com", True),
    ]:
        await store.add_contact(
            project_id, A, U, kind=kind, destination=destination, opted_out=opted_out,
            now=clock.now(),
        )  # fmt: skip
        clock.advance(timedelta(seconds=1))
    return project_id


@pytest.fixture
async def worker(
    engine: AsyncEngine, worker_settings: Settings, clock: ManualClock
) -> AsyncIterator[ChannelsWorker]:
    """A worker in bounded mode (no consumer, no loop): tests call fan_out and sweep."""
    made = ChannelsWorker(worker_settings, engine, clock=clock, rand=lambda: 0.5)
    try:
        yield made
    finally:
        await made.stop()


def _note(
    project_id: str, n: int, clock: ManualClock, check_type: str = "reminder"
) -> dict[str, Any]:
    row = notification(project_id, A, U, n, clock.now())
    row["check_type"] = check_type
    row["generated_message"] = f"Time for your walk ({n})"
    return row


async def test_jetstream_message_reaches_every_provider(
    engine: AsyncEngine,
    project: str,
    worker_settings: Settings,
    clock: ManualClock,
    nats_url: str,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """notification.created on JetStream -> push, email and SMS; the opted-out address is not."""
    row = _note(project, 1, clock)
    await add_notifications(engine, [row])
    results: asyncio.Queue[FanoutResult] = asyncio.Queue()
    worker = ChannelsWorker(
        worker_settings, engine, clock=clock, nats_url=nats_url, on_result=results.put_nowait
    )
    await worker.start()
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        subjects = Subjects(worker_settings.subject_prefix)
        await ensure_stream(js, subjects)
        created = NotificationCreated(
            notification_id=row["id"], project_id=project, agent_id=A, user_id=U,
            event_type=row["event_type"],
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

    assert (result.sent, result.skipped, result.failed) == (3, 1, 0)
    assert [s["message"]["token"] for s in fcm_standin.sends] == [TOKEN]
    assert fcm_standin.sends[0]["message"]["notification"]["body"] == "Time for your walk (1)"
    assert [m["To"] for m in twilio_standin.messages] == [NUMBER]
    assert twilio_standin.messages[0]["Body"] == "Time for your walk (1)"
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]
    raw = plain_smtp.sink.envelopes[0].original_content
    assert raw is not None
    mail = email.message_from_bytes(raw, policy=email.policy.default)
    assert mail["To"] == ADDRESS
    text = mail.get_body(("plain",))
    assert text is not None
    assert text.get_content().strip() == "Time for your walk (1)"

    attempts = await ChannelStore(engine).list_attempts(
        project, A, U, notification_id=row["id"], limit=50
    )
    assert sorted((a["kind"], a["status"], a["reason"]) for a in attempts) == [
        ("email", "sent", ""),
        ("email", "skipped", "opted_out"),
        ("fcm", "sent", ""),
        ("sms", "sent", ""),
    ]
    assert all(a["attempt_number"] == 1 and a["next_attempt_at"] is None for a in attempts)
    assert {a["destination"] for a in attempts} >= {"…@example.com", "…0100"}, "redacted"


async def test_preferences_opt_out_dead_token_and_retry(
    engine: AsyncEngine,
    project: str,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
    worker_settings: Settings,
) -> None:
    """Preferences and opt-outs skip; a dead token is disabled; a 503 SMS is retried later."""
    store = ChannelStore(engine, secrets=SecretBox.from_settings(worker_settings))
    await store.put_preferences(project, A, U, {"quiet": ["email"]}, clock.now())

    quiet = _note(project, 1, clock, check_type="quiet")
    await add_notifications(engine, [quiet])
    result = await worker.fan_out([quiet["id"]])
    assert (result.sent, result.skipped) == (1, 3)
    assert fcm_standin.sends == []
    assert twilio_standin.messages == []
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]
    reasons = {
        (a["kind"], a["reason"])
        for a in await store.list_attempts(project, A, U, notification_id=quiet["id"], limit=9)
    }
    assert reasons == {
        ("email", ""), ("email", "opted_out"), ("fcm", "not_preferred"), ("sms", "not_preferred"),
    }  # fmt: skip

    # A redelivery of the same message sends nothing again.
    assert (await worker.fan_out([quiet["id"]])).sent == 0
    assert plain_smtp.sink.count == 1

    fcm_standin.dead_tokens.add(TOKEN)
    busy = twilio_error(503, 20503, "Service Unavailable")
    twilio_standin.script.append(Canned(503, busy.body))
    clock.advance(timedelta(minutes=1))
    loud = _note(project, 2, clock)
    await add_notifications(engine, [loud])
    result = await worker.fan_out([loud["id"]])
    assert (result.sent, result.failed, result.disabled, result.retries_scheduled) == (1, 2, 1, 1)
    contacts = {c["kind"]: c for c in await store.list_contacts(project, A, U)}
    assert contacts["fcm"]["disabled"] is True
    assert "UNREGISTERED" in contacts["fcm"]["disabled_reason"]
    attempts = await store.list_attempts(project, A, U, notification_id=loud["id"], limit=9)
    sms = next(a for a in attempts if a["kind"] == "sms")
    assert sms["status"] == "failed"
    assert sms["response_code"] == 503
    assert sms["next_attempt_at"] == clock.now() + timedelta(seconds=5), "attempt 2 after 5 s"

    assert (await worker.sweep()).sent == 0, "not due yet"
    clock.advance(timedelta(seconds=5))
    retried = await worker.sweep()
    assert retried.sent == 1
    assert [m["To"] for m in twilio_standin.messages] == [NUMBER], "the 503 is not a message"
    assert twilio_standin.send_count == 2
    attempts = await store.list_attempts(project, A, U, notification_id=loud["id"], limit=9)
    sms_rows = sorted((a["attempt_number"], a["status"]) for a in attempts if a["kind"] == "sms")
    assert sms_rows == [(1, "failed"), (2, "sent")]
    assert all(a["next_attempt_at"] is None for a in attempts), "the retry queue is empty"
    assert (await worker.sweep()).sent == 0

    # The dead token is no longer tried; an unsubscribed number is disabled too.
    twilio_standin.unsubscribed.add(NUMBER)
    third = _note(project, 3, clock)
    await add_notifications(engine, [third])
    result = await worker.fan_out([third["id"]])
    assert result.sent == 1
    assert len(fcm_standin.sends) == 1, "only the first, dead-token send reached FCM"
    contacts = {c["kind"]: c for c in await store.list_contacts(project, A, U)}
    assert contacts["sms"]["disabled"] is True

    # The app registering the token again (a reinstall) re-enables it.
    again, created = await store.add_contact(
        project, A, U, kind="fcm", destination=TOKEN, opted_out=False, now=clock.now()
    )
    assert (created, again["disabled"], again["disabled_reason"]) == (False, False, None)


async def test_retry_stops_once_the_message_is_consumed(
    engine: AsyncEngine,
    project: str,
    worker: ChannelsWorker,
    clock: ManualClock,
    twilio_standin: TwilioStandIn,
) -> None:
    """A message read through polling before its retry gets no further SMS."""
    store = ChannelStore(engine)
    await store.put_preferences(project, A, U, {"*": ["sms"]}, clock.now())
    twilio_standin.script.append(Canned(503, twilio_error(503, 20503, "busy").body))
    row = _note(project, 1, clock)
    await add_notifications(engine, [row])
    assert (await worker.fan_out([row["id"]])).retries_scheduled == 1
    await SqlStore(engine).notifications.consume_notification(project, A, row["id"], clock.now())
    clock.advance(timedelta(minutes=1))
    result = await worker.sweep()
    assert (result.sent, result.skipped) == (0, 1)
    assert twilio_standin.send_count == 1
    attempts = await store.list_attempts(project, A, U, notification_id=row["id"], limit=9)
    latest = next((a["attempt_number"], a["reason"]) for a in attempts if a["kind"] == "sms")
    assert latest == (2, "notification_not_pending")


async def test_retry_stops_at_the_deadline(
    engine: AsyncEngine,
    project: str,
    worker: ChannelsWorker,
    clock: ManualClock,
    twilio_standin: TwilioStandIn,
) -> None:
    """A message whose deadline passes before its retry gets no further SMS."""
    store = ChannelStore(engine)
    await store.put_preferences(project, A, U, {"*": ["sms"]}, clock.now())
    twilio_standin.script.append(Canned(503, twilio_error(503, 20503, "busy").body))
    row = {**_note(project, 1, clock), "expires_at": clock.now() + timedelta(seconds=30)}
    await add_notifications(engine, [row])
    assert (await worker.fan_out([row["id"]])).retries_scheduled == 1
    clock.advance(timedelta(minutes=1))
    result = await worker.sweep()
    assert (result.sent, result.skipped) == (0, 1)
    assert twilio_standin.send_count == 1
    attempts = await store.list_attempts(project, A, U, notification_id=row["id"], limit=9)
    latest = next((a["attempt_number"], a["reason"]) for a in attempts if a["kind"] == "sms")
    assert latest == (2, "notification_expired")


async def test_a_message_past_its_deadline_is_not_fanned_out(
    engine: AsyncEngine,
    project: str,
    worker: ChannelsWorker,
    clock: ManualClock,
    twilio_standin: TwilioStandIn,
) -> None:
    """The first fan-out of a message already past its deadline sends nothing."""
    store = ChannelStore(engine)
    await store.put_preferences(project, A, U, {"*": ["sms"]}, clock.now())
    row = {**_note(project, 1, clock), "expires_at": clock.now() - timedelta(seconds=1)}
    await add_notifications(engine, [row])
    result = await worker.fan_out([row["id"]])
    assert result.sent == 0
    assert twilio_standin.send_count == 0


async def test_a_traced_message_keeps_its_span_around_its_sends(
    engine: AsyncEngine,
    project: str,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """
    Tracing on: the notification whose message carried a trace gets its "channels
    fan-out" span in that trace, and the batch's other notification is sent with it.
    """
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        traced, plain = _note(project, 1, clock), _note(project, 2, clock)
        await add_notifications(engine, [traced, plain])
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        worker._keep_carrier(traced["id"], {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})

        result = await worker.fan_out([traced["id"], plain["id"]])
    finally:
        tracing.use_provider(None)

    assert (result.notifications, result.sent) == (2, 6)
    [span] = [s for s in exporter.get_finished_spans() if s.name == "channels fan-out"]
    assert span.context is not None
    assert f"{span.context.trace_id:032x}" == trace_id
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == traced["id"]
