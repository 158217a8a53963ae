"""Fan-out: the pure plan, isolation between channels, and the real three channels together."""

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs

from delivery.clock import ManualClock
from delivery.settings import Settings
from handlers.base import Channel, Delivered, Failed, Message, Outcome, Retry
from handlers.contacts import Contact, ContactKind
from handlers.email import SmtpChannel, SmtpSecurity
from handlers.fanout import (
    AttemptStatus,
    ChannelAttempt,
    ChannelRouter,
    PlannedSend,
    SkipReason,
    channels_from_settings,
    plan_fanout,
    summarize,
)
from handlers.fcm import FcmChannel
from handlers.sms import SmsChannel
from tests.handlers.channels.conftest import SmtpServer, make_message
from tests.handlers.channels.standins import (
    Canned,
    FcmStandIn,
    TwilioStandIn,
    free_port,
    twilio_error,
)

FCM = ContactKind.FCM
EMAIL = ContactKind.EMAIL
SMS = ContactKind.SMS
TOKEN = "device-token:APA91b" + "z" * 40
ADDRESS = "ada@example.com"
NUMBER = "+14155550100"


class RecordingChannel:
    """Answers a fixed outcome and remembers what it was asked to send."""

    def __init__(self, outcome: Outcome | None = None) -> None:
        self.outcome = outcome or Delivered(200)
        self.sent: list[tuple[str, str]] = []

    async def send(self, message: Message, destination: str) -> Outcome:
        self.sent.append((message.event_id, destination))
        return self.outcome


class BarrierChannel(RecordingChannel):
    """Only answers once every channel sharing the barrier has started: proves concurrency."""

    def __init__(self, barrier: asyncio.Barrier) -> None:
        super().__init__()
        self.barrier = barrier

    async def send(self, message: Message, destination: str) -> Outcome:
        await self.barrier.wait()
        return await super().send(message, destination)


class HangingChannel:
    """Never answers, like a provider that accepted the connection and went silent."""

    async def send(self, message: Message, destination: str) -> Outcome:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class CrashingChannel:
    """Breaks the channel contract by raising."""

    async def send(self, message: Message, destination: str) -> Outcome:
        raise RuntimeError("bug in channel")


def _contacts(*, email_opted_out: bool = False) -> list[Contact]:
    return [
        Contact(FCM, TOKEN),
        Contact(EMAIL, ADDRESS, opted_out=email_opted_out),
        Contact(SMS, NUMBER),
    ]


@pytest.mark.parametrize(
    ("contacts", "preferences", "available", "expected"),
    [
        (
            _contacts(),
            None,
            {FCM, EMAIL, SMS},
            [PlannedSend(c) for c in _contacts()],
        ),
        (
            _contacts(email_opted_out=True),
            None,
            {FCM, EMAIL, SMS},
            [
                PlannedSend(Contact(FCM, TOKEN)),
                PlannedSend(Contact(EMAIL, ADDRESS, True), SkipReason.OPTED_OUT),
                PlannedSend(Contact(SMS, NUMBER)),
            ],
        ),
        (
            _contacts(),
            {"daily_checkin": ["fcm"]},
            {FCM, EMAIL, SMS},
            [
                PlannedSend(Contact(FCM, TOKEN)),
                PlannedSend(Contact(EMAIL, ADDRESS), SkipReason.NOT_PREFERRED),
                PlannedSend(Contact(SMS, NUMBER), SkipReason.NOT_PREFERRED),
            ],
        ),
        (
            _contacts(email_opted_out=True),
            {"*": ["sms"]},
            {FCM, EMAIL, SMS},
            [
                PlannedSend(Contact(FCM, TOKEN), SkipReason.NOT_PREFERRED),
                PlannedSend(Contact(EMAIL, ADDRESS, True), SkipReason.OPTED_OUT),
                PlannedSend(Contact(SMS, NUMBER)),
            ],
        ),
        (
            _contacts(),
            {"weekly_review": []},
            {FCM, EMAIL},
            [
                PlannedSend(Contact(FCM, TOKEN)),
                PlannedSend(Contact(EMAIL, ADDRESS)),
                PlannedSend(Contact(SMS, NUMBER), SkipReason.NO_CHANNEL),
            ],
        ),
        (
            [Contact(SMS, NUMBER), Contact(SMS, NUMBER, opted_out=True), Contact(SMS, "+4420")],
            None,
            {SMS},
            [PlannedSend(Contact(SMS, NUMBER)), PlannedSend(Contact(SMS, "+4420"))],
        ),
        ([], None, {FCM}, []),
    ],
    ids=[
        "all-active",
        "opted-out-skipped",
        "preference-restricts",
        "opt-out-wins-over-preference",
        "unconfigured-channel",
        "duplicates-collapsed-first-wins",
        "no-contacts",
    ],
)
def test_plan_fanout(
    contacts: list[Contact],
    preferences: dict[str, list[str]] | None,
    available: set[ContactKind],
    expected: list[PlannedSend],
) -> None:
    """The plan sends to active, preferred, configured contacts and says why it skips."""
    assert plan_fanout("daily_checkin", contacts, preferences, available) == expected


async def test_sends_run_concurrently_and_records_keep_contact_order() -> None:
    """All three sends are in flight at once; records come back in contact order."""
    barrier = asyncio.Barrier(3)
    channels: dict[ContactKind, Channel] = {k: BarrierChannel(barrier) for k in (FCM, EMAIL, SMS)}
    ticks = itertools.count()
    router = ChannelRouter(channels, timer=lambda: float(next(ticks)))

    attempts = await asyncio.wait_for(router.fan_out(make_message(), _contacts()), 5)

    assert [(a.kind, a.destination, a.status) for a in attempts] == [
        (FCM, TOKEN, AttemptStatus.SENT),
        (EMAIL, ADDRESS, AttemptStatus.SENT),
        (SMS, NUMBER, AttemptStatus.SENT),
    ]
    assert all(a.duration > timedelta(0) for a in attempts)
    assert summarize(attempts) == {"sent": 3, "failed": 0, "skipped": 0}


async def test_a_hung_channel_times_out_without_blocking_the_others() -> None:
    """A provider that never answers becomes a Retry; the other channels are sent."""
    email, sms = RecordingChannel(), RecordingChannel()
    router = ChannelRouter(
        {FCM: HangingChannel(), EMAIL: email, SMS: sms}, send_timeout=timedelta(seconds=0.05)
    )

    attempts = await asyncio.wait_for(router.fan_out(make_message(), _contacts()), 5)

    fcm_attempt, email_attempt, sms_attempt = attempts
    assert fcm_attempt.status is AttemptStatus.FAILED
    assert fcm_attempt.retryable
    assert "timed out" in fcm_attempt.reason
    assert email_attempt.status is sms_attempt.status is AttemptStatus.SENT
    assert email.sent == [(make_message().event_id, ADDRESS)]
    assert sms.sent == [(make_message().event_id, NUMBER)]


class HangingFor:
    """Hangs for one destination, answers the others; notes the sends it saw cancelled."""

    def __init__(self, hang_on: str) -> None:
        self.hang_on = hang_on
        self.cancelled: list[str] = []

    async def send(self, message: Message, destination: str) -> Outcome:
        if destination == self.hang_on:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.append(message.event_id)
                raise
        return Delivered(200)


async def test_many_messages_share_one_deadline_and_keep_their_order() -> None:
    """
    Three messages at once: each gets its own attempts in its contacts' order; the
    one send that hangs is a Retry at the deadline and was cancelled (its clean-up
    ran) before the answer, while every other send of the batch went out.
    """
    hanging = HangingFor(NUMBER)
    router = ChannelRouter(
        {FCM: RecordingChannel(), EMAIL: RecordingChannel(), SMS: hanging},
        send_timeout=timedelta(seconds=0.05),
    )
    messages = [make_message(event_id=f"evt_{n}") for n in range(3)]
    jobs = [
        (messages[0], _contacts(), None),
        (messages[1], [Contact(EMAIL, "b@example.com")], None),
        (messages[2], [Contact(SMS, "+14155550101"), Contact(FCM, TOKEN, opted_out=True)], None),
    ]

    results = await asyncio.wait_for(router.fan_out_many(jobs), 5)

    assert [[(a.destination, a.status) for a in attempts] for attempts in results] == [
        [
            (TOKEN, AttemptStatus.SENT),
            (ADDRESS, AttemptStatus.SENT),
            (NUMBER, AttemptStatus.FAILED),
        ],
        [("b@example.com", AttemptStatus.SENT)],
        [("+14155550101", AttemptStatus.SENT), (TOKEN, AttemptStatus.SKIPPED)],
    ]
    assert "timed out" in results[0][2].reason
    assert results[0][2].retryable
    assert hanging.cancelled == ["evt_0"]


async def test_cancelling_a_fan_out_cancels_its_sends() -> None:
    """A cancelled caller leaves no send running behind it."""
    hanging = HangingFor(TOKEN)
    router = ChannelRouter({FCM: hanging})
    task = asyncio.create_task(router.fan_out(make_message(), [Contact(FCM, TOKEN)]))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert hanging.cancelled == [make_message().event_id]


class SlowToCleanUp:
    """Hangs; on cancellation its clean-up (closing a connection, say) takes a few steps."""

    def __init__(self) -> None:
        self.cleaned_up = False

    async def send(self, message: Message, destination: str) -> Outcome:
        try:
            await asyncio.Event().wait()
        finally:
            for _ in range(3):
                await asyncio.sleep(0)
            self.cleaned_up = True
        return Delivered(200)


async def test_a_cancelled_fan_out_returns_after_its_sends_cleaned_up() -> None:
    """As gather did: the cancellation reaches the caller once the sends have finished."""
    slow = SlowToCleanUp()
    router = ChannelRouter({FCM: slow})
    task = asyncio.create_task(router.fan_out(make_message(), [Contact(FCM, TOKEN)]))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.cleaned_up


async def test_a_crashing_channel_is_contained() -> None:
    """A channel that raises yields a retryable failure and an error log; others are sent."""
    router = ChannelRouter(
        {FCM: CrashingChannel(), EMAIL: RecordingChannel(), SMS: RecordingChannel()}
    )

    with capture_logs() as logs:
        attempts = await router.fan_out(make_message(), _contacts())

    assert [a.status for a in attempts] == [
        AttemptStatus.FAILED,
        AttemptStatus.SENT,
        AttemptStatus.SENT,
    ]
    assert attempts[0].retryable
    assert "bug in channel" in attempts[0].reason
    assert [entry["event"] for entry in logs] == ["fanout.send.crashed"]
    assert logs[0]["log_level"] == "error"
    assert TOKEN not in str(logs)


async def test_attempt_exposes_retry_and_disable_hints() -> None:
    """Retry-After and disable_destination travel on the attempt record."""
    router = ChannelRouter(
        {
            FCM: RecordingChannel(Failed("dead", 404, disable_destination=True)),
            EMAIL: RecordingChannel(Retry("busy", 450, timedelta(seconds=30))),
        }
    )

    fcm_attempt, email_attempt, sms_attempt = await router.fan_out(make_message(), _contacts())

    assert fcm_attempt.disable_destination
    assert not fcm_attempt.retryable
    assert email_attempt.retryable
    assert email_attempt.retry_after == timedelta(seconds=30)
    assert sms_attempt == ChannelAttempt(
        SMS, NUMBER, AttemptStatus.SKIPPED, SkipReason.NO_CHANNEL, timedelta(0)
    )


@pytest.fixture
async def real_channels(
    fcm_channel: FcmChannel,
    sms_channel: SmsChannel,
    plain_smtp: SmtpServer,
    clock: ManualClock,
) -> AsyncIterator[dict[ContactKind, Channel]]:
    smtp = SmtpChannel(
        "127.0.0.1",
        plain_smtp.port,
        "notify@mail.example.com",
        clock=clock,
        security=SmtpSecurity.PLAIN,
        timeout_s=5,
    )
    yield {FCM: fcm_channel, EMAIL: smtp, SMS: sms_channel}
    await smtp.aclose()  # its pooled connection, as the worker's stop closes it


async def test_real_fanout_reaches_every_provider(
    real_channels: dict[ContactKind, Channel],
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
    plain_smtp: SmtpServer,
) -> None:
    """One message reaches the FCM, Twilio and SMTP stand-ins, each exactly once."""
    attempts = await ChannelRouter(real_channels).fan_out(make_message(), _contacts())

    assert [a.status for a in attempts] == [AttemptStatus.SENT] * 3
    assert [s["message"]["token"] for s in fcm_standin.sends] == [TOKEN]
    assert [m["To"] for m in twilio_standin.messages] == [NUMBER]
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]


async def test_real_fanout_honours_opt_out_and_preferences(
    real_channels: dict[ContactKind, Channel],
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
    plain_smtp: SmtpServer,
) -> None:
    """An opted-out address and a channel the user excluded are never contacted."""
    attempts = await ChannelRouter(real_channels).fan_out(
        make_message(), _contacts(email_opted_out=True), {"daily_checkin": ["email", "fcm"]}
    )

    assert [(a.kind, a.status, a.reason) for a in attempts] == [
        (FCM, AttemptStatus.SENT, ""),
        (EMAIL, AttemptStatus.SKIPPED, "opted_out"),
        (SMS, AttemptStatus.SKIPPED, "not_preferred"),
    ]
    assert len(fcm_standin.sends) == 1
    assert twilio_standin.messages == []
    assert plain_smtp.sink.count == 0


async def test_real_failures_in_two_channels_do_not_block_the_third(
    fcm_channel: FcmChannel,
    sms_channel: SmsChannel,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
    clock: ManualClock,
) -> None:
    """A dead FCM token and an unreachable SMTP server leave the SMS sent; the token is pruned."""
    fcm_standin.dead_tokens.add(TOKEN)
    down = SmtpChannel(
        "127.0.0.1",
        free_port(),
        "n@mail.example.com",
        clock=clock,
        security=SmtpSecurity.PLAIN,
        timeout_s=2,
    )
    router = ChannelRouter({FCM: fcm_channel, EMAIL: down, SMS: sms_channel})

    fcm_attempt, email_attempt, sms_attempt = await router.fan_out(make_message(), _contacts())

    assert fcm_attempt.status is AttemptStatus.FAILED
    assert fcm_attempt.disable_destination
    assert email_attempt.status is AttemptStatus.FAILED
    assert email_attempt.retryable
    assert sms_attempt.status is AttemptStatus.SENT
    assert [m["To"] for m in twilio_standin.messages] == [NUMBER]


async def test_real_rate_limited_sms_is_retryable_with_retry_after(
    real_channels: dict[ContactKind, Channel],
    twilio_standin: TwilioStandIn,
) -> None:
    """A 429 from the SMS provider surfaces as a retryable attempt carrying Retry-After."""
    error = twilio_error(429, 20429, "Too Many Requests")
    twilio_standin.script.append(Canned(429, error.body, {"Retry-After": "12"}))

    attempts = await ChannelRouter(real_channels).fan_out(make_message(), _contacts())

    assert attempts[2].retryable
    assert attempts[2].retry_after == timedelta(seconds=12)
    assert [a.status for a in attempts[:2]] == [AttemptStatus.SENT, AttemptStatus.SENT]


async def test_channels_from_settings_builds_what_is_configured(
    tmp_path: Path,
    service_account_info: dict[str, str],
    http_client: httpx.AsyncClient,
    clock: ManualClock,
) -> None:
    """Fully configured providers become channels; unconfigured ones are absent."""
    key_file = tmp_path / "sa.json"
    key_file.write_text(json.dumps(service_account_info))
    settings = Settings(
        fcm_service_account_file=key_file,
        smtp_host="smtp.example.com",
        smtp_from="notify@example.com",
        sms_account_sid="AC1",
        sms_auth_token="t",
        sms_from="+15005550006",
    )

    built = channels_from_settings(settings, client=http_client, clock=clock)
    assert {kind: type(channel) for kind, channel in built.items()} == {
        FCM: FcmChannel,
        EMAIL: SmtpChannel,
        SMS: SmsChannel,
    }
    assert channels_from_settings(Settings(), client=http_client, clock=clock) == {}


@pytest.mark.parametrize(
    "partial",
    [{"sms_account_sid": "AC1"}, {"smtp_from": "a@example.com"}, {"smtp_host": "smtp.example.com"}],
    ids=["sms-sid-only", "smtp-from-only", "smtp-host-only"],
)
async def test_half_configured_provider_fails_at_start_up(
    partial: dict[str, str], http_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """A provider with some but not all of its settings is a start-up error."""
    with pytest.raises(ValueError, match="must"):
        channels_from_settings(Settings(**partial), client=http_client, clock=clock)  # type: ignore[arg-type]
