"""
Channel fallback on SQLite and PostgreSQL, against the local FCM and Twilio stand-ins
and a real aiosmtpd server, driven by a ManualClock: one channel at a time in the
user's order, the next one only when the current one has not sent within the delay
(or failed for good), never a second channel once one has sent, every decision
recorded, and a step cut short by a dead worker repeated on the same channel.
"""

import asyncio
import json
import os
import signal
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.clock import ManualClock, SystemClock
from delivery.policy import QuietHours, quiet_wait
from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store.channels import ChannelStore, FallbackStep
from delivery.store.policy import PolicyStore
from delivery.store.sql import SqlStore
from delivery.store.tables import OFFSETS
from handlers.channels_worker import ChannelsWorker
from handlers.retry import SCHEDULE
from tests.api.notes import add_notifications, notification
from tests.channels.conftest import Api
from tests.handlers.channels.conftest import ACCOUNT_SID, AUTH_TOKEN, SMS_FROM, SmtpServer
from tests.handlers.channels.standins import (
    FcmStandIn,
    SmtpSink,
    TwilioStandIn,
    fcm_error,
    free_port,
)
from tests.worker_proc import start_worker

A, U = "agent-1", "user-1"
TOKEN = "dXNlci0xLWRldmljZQ:APA91bHdeviceTokenForUser1"
ADDRESS = "ann@example.com"
NUMBER = "+14155550100"
DELAY = timedelta(minutes=10)


@pytest.fixture
def fallback_settings(
    tmp_path: Path,
    service_account_info: dict[str, str],
    provider_url: str,
    plain_smtp: SmtpServer,
    subject_prefix: str,
) -> Settings:
    """Every provider on its local stand-in, fallback after ten minutes."""
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
        channel_fallback_after_s=DELAY.total_seconds(),
    )


@pytest.fixture
async def project(engine: AsyncEngine, clock: ManualClock) -> str:
    """The project of the user."""
    return (await SqlStore(engine).keys.ensure_project("alpha", clock.now())).id


@pytest.fixture
async def store(
    engine: AsyncEngine, clock: ManualClock, fallback_settings: Settings, project: str
) -> ChannelStore:
    """A user with a number, an address and a push token (created in that order)."""
    made = ChannelStore(engine, secrets=SecretBox.from_settings(fallback_settings))
    for kind, destination in [("sms", NUMBER), ("email", ADDRESS), ("fcm", TOKEN)]:
        await made.add_contact(
            project, A, U, kind=kind, destination=destination, opted_out=False, now=clock.now()
        )
    return made


@pytest.fixture
async def worker(
    engine: AsyncEngine, fallback_settings: Settings, clock: ManualClock
) -> AsyncIterator[ChannelsWorker]:
    """A worker in bounded mode: tests call fan_out and sweep."""
    made = ChannelsWorker(fallback_settings, engine, clock=clock, rand=lambda: 0.5)
    try:
        yield made
    finally:
        await made.stop()


async def _message(engine: AsyncEngine, project: str, clock: ManualClock, n: int) -> str:
    row = notification(project, A, U, n, clock.now())
    await add_notifications(engine, [row])
    return str(row["id"])


async def _attempts(store: ChannelStore, project: str, nid: str) -> list[tuple[str, int, str]]:
    rows = await store.list_attempts(project, A, U, notification_id=nid, limit=50)
    return sorted((r["kind"], r["attempt_number"], r["status"]) for r in rows)


async def _decisions(store: ChannelStore, nid: str) -> list[tuple[str, str]]:
    row = await store.get_fallback(nid)
    assert row is not None
    return [(d["kind"], d["decision"]) for d in json.loads(row["decisions_json"])]


async def test_push_then_email_never_sms(
    engine: AsyncEngine,
    api: Api,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """
    No preference: push first. Push keeps failing (retried within its ten
    minutes), email goes out at the deadline, SMS never, nothing after that.
    """
    for _ in range(5):
        fcm_standin.script.append(fcm_error(503, "UNAVAILABLE", "The service is unavailable."))
    nid = await _message(engine, project, clock, 1)
    first = await worker.fan_out([nid])
    assert (first.sent, first.failed) == (0, 1)
    assert len(fcm_standin.sends) == 1
    assert plain_smtp.sink.count == 0
    assert twilio_standin.send_count == 0
    assert (await worker.fan_out([nid])).failed == 0, "a redelivery sends nothing more"
    assert len(fcm_standin.sends) == 1

    clock.advance(SCHEDULE[1])  # push retry 2, inside the ten minutes
    await worker.sweep()
    clock.advance(SCHEDULE[2])  # retry 3 at 5 min 5 s; the next would be past the deadline
    await worker.sweep()
    assert len(fcm_standin.sends) == 3
    assert plain_smtp.sink.count == 0, "push still has time"
    clock.advance(DELAY - SCHEDULE[1] - SCHEDULE[2] - timedelta(seconds=1))
    await worker.sweep()
    assert plain_smtp.sink.count == 0, "one second before the deadline"
    clock.advance(timedelta(seconds=1))
    moved = await worker.sweep()
    assert moved.sent == 1
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]
    clock.advance(timedelta(days=1))
    await worker.sweep()
    assert twilio_standin.send_count == 0, "email sent it: no SMS"
    assert len(fcm_standin.sends) == 3
    assert plain_smtp.sink.count == 1

    assert await _attempts(store, project, nid) == [
        ("email", 1, "sent"),
        ("fcm", 1, "failed"),
        ("fcm", 2, "failed"),
        ("fcm", 3, "failed"),
    ]
    assert await _decisions(store, nid) == [
        ("fcm", "first"),
        ("fcm", "retry"),
        ("fcm", "retry"),
        ("fcm", "retry"),
        ("fcm", "retry"),
        ("fcm", "waiting"),
        ("email", "fallback"),
        ("email", "delivered"),
    ]
    row = await store.get_fallback(nid)
    assert row is not None
    assert (row["status"], row["next_attempt_at"], row["claim"]) == ("delivered", None, None)
    # The user timeline shows the fallback with its decisions beside the attempts.
    assert api.projects["alpha"] == project
    timeline = await api.alpha.get(f"/api/v1/agents/{A}/users/{U}/timeline")
    assert timeline.status_code == 200, timeline.text
    (event,) = [e for e in timeline.json()["events"] if e["kind"] == "channel.fallback"]
    assert event["detail"]["status"] == "delivered"
    assert event["detail"]["order"] == ["fcm", "email", "sms"]
    assert "fcm -> email -> sms" in event["summary"]
    assert "email sent it" in event["summary"]
    assert [d["decision"] for d in event["detail"]["decisions"]][-2:] == ["fallback", "delivered"]


async def test_first_channel_sends_so_no_other_does(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """Push delivers at once: nothing else, however long we wait."""
    nid = await _message(engine, project, clock, 1)
    assert (await worker.fan_out([nid])).sent == 1
    for _ in range(3):
        clock.advance(DELAY)
        await worker.sweep()
    assert len(fcm_standin.sends) == 1
    assert plain_smtp.sink.count == 0
    assert twilio_standin.send_count == 0
    assert await _attempts(store, project, nid) == [("fcm", 1, "sent")]
    assert await _decisions(store, nid) == [("fcm", "first"), ("fcm", "delivered")]


async def test_preference_order_and_a_dead_number_move_on_at_once(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """
    ``{"*": ["sms", "email"]}``: SMS first; an unsubscribed number fails for good,
    so email follows without waiting out the delay; push is never preferred.
    """
    await store.put_preferences(project, A, U, {"*": ["sms", "email"]}, clock.now())
    twilio_standin.unsubscribed.add(NUMBER)
    nid = await _message(engine, project, clock, 1)
    first = await worker.fan_out([nid])
    assert (first.failed, first.skipped) == (1, 1)  # SMS failed, push not preferred
    assert plain_smtp.sink.count == 0
    moved = await worker.sweep()  # due at once: the number is dead
    assert moved.sent == 1
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]
    assert fcm_standin.sends == []
    assert await _attempts(store, project, nid) == [
        ("email", 1, "sent"),
        ("fcm", 1, "skipped"),
        ("sms", 1, "failed"),
    ]
    assert [d for _k, d in await _decisions(store, nid)] == [
        "first",
        "failed",
        "fallback",
        "delivered",
    ]


async def test_a_step_cut_short_is_repeated_on_its_channel(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """
    A worker claims the due row, writes "email, attempt 1" and dies before
    recording (its send may have gone out). After its lease, past email's own
    deadline, the next worker sends email again, not SMS: the channel a dead
    worker may have used is the only one that may be used.
    """
    fcm_standin.script.append(fcm_error(400, "INVALID_ARGUMENT", "bad", "INVALID_ARGUMENT"))
    nid = await _message(engine, project, clock, 1)
    await worker.fan_out([nid])  # push fails for good: due at once
    (row,) = await store.claim_due_fallbacks(
        clock.now(), lease=timedelta(minutes=2), limit=10, token="chw_dead"
    )
    decisions = [*json.loads(row["decisions_json"]), {"decision": "fallback", "kind": "email"}]
    step = FallbackStep(
        "active", 1, 1, clock.now() + DELAY, row["next_attempt_at"], json.dumps(decisions)
    )
    assert await store.begin_fallback_step(nid, "chw_dead", step, now=clock.now())
    assert (await worker.sweep()).sent == 0, "the dead worker's lease still holds"
    clock.advance(DELAY + timedelta(minutes=1))
    resumed = await worker.sweep()
    assert resumed.sent == 1
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]
    assert twilio_standin.send_count == 0
    clock.advance(timedelta(days=1))
    await worker.sweep()
    assert twilio_standin.send_count == 0
    kinds: list[Any] = await _decisions(store, nid)
    assert kinds[-2:] == [("email", "resumed"), ("email", "delivered")]
    # The dead worker's late finish changes nothing: its claim is gone.
    late = FallbackStep("active", 2, 1, clock.now(), clock.now(), "[]")
    assert not await store.finish_fallback_step(nid, "chw_dead", [], late, now=clock.now())
    final = await store.get_fallback(nid)
    assert final is not None
    assert final["status"] == "delivered"


class HangingSink(SmtpSink):
    """Accepts every message, but holds the first one's DATA reply: the kill lands there."""

    def __init__(self) -> None:
        super().__init__()
        self.first_data = threading.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count the message (it reached the mailbox), then hang the first time."""
        reply = await super().handle_DATA(server, session, envelope)
        if self.count == 1:
            self.first_data.set()
            await asyncio.sleep(HANG_S)
        return reply


HANG_S = 20.0
"""How long the first email's DATA is held: far longer than the kill takes to land."""
LEASE_S = 3.0


@pytest.mark.slow
async def test_sigkill_mid_send_repeats_that_channel_only(
    engine: AsyncEngine,
    database_url: str,
    project: str,
    store: ChannelStore,
    clock: ManualClock,
    fallback_settings: Settings,
    provider_url: str,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
    tmp_path: Path,
) -> None:
    """
    SMS (first) fails for good; a real worker process moves to email and is
    SIGKILLed while the mail server holds the message it has accepted. The next
    process, after the lease and long past email's own delay, sends email again
    and never push: the message reaches no channel beyond the one that had it.
    """
    await store.put_preferences(project, A, U, {"*": ["sms", "email", "fcm"]}, clock.now())
    twilio_standin.unsubscribed.add(NUMBER)
    sink = HangingSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        # The first step, as the NATS-driven fan-out does it; the row is due at once.
        real = ChannelsWorker(
            fallback_settings.model_copy(update={"smtp_port": controller.port}),
            engine,
            clock=SystemClock(),
        )
        nid = await _message(engine, project, SystemClock(), 1)
        assert (await real.fan_out([nid])).failed == 1
        await real.stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
        env |= {
            "DELIVERY_DATABASE_URL": database_url,
            "DELIVERY_DATA_DIR": str(tmp_path),
            "DELIVERY_LOG_LEVEL": "WARNING",
            "DELIVERY_FCM_SERVICE_ACCOUNT_FILE": str(tmp_path / "service-account.json"),
            "DELIVERY_FCM_BASE_URL": provider_url,
            "DELIVERY_FCM_TOKEN_URL": f"{provider_url}/token",
            "DELIVERY_SMTP_HOST": "127.0.0.1",
            "DELIVERY_SMTP_PORT": str(controller.port),
            "DELIVERY_SMTP_SECURITY": "plain",
            "DELIVERY_SMTP_FROM": "agent@mail.example.com",
            "DELIVERY_SMS_BASE_URL": provider_url,
            "DELIVERY_SMS_ACCOUNT_SID": ACCOUNT_SID,
            "DELIVERY_SMS_AUTH_TOKEN": AUTH_TOKEN,
            "DELIVERY_SMS_FROM": SMS_FROM,
            "DELIVERY_CHANNEL_FALLBACK_AFTER_S": "1",
        }
        worker = await start_worker("channels", LEASE_S, env)
        try:
            assert await asyncio.to_thread(sink.first_data.wait, 20), worker.printed()
        finally:
            await worker.stop(signal.SIGKILL)
        row = await store.get_fallback(nid)
        assert row is not None
        assert (row["status"], row["sending"], json.loads(row["order_json"])[row["step"]]) == (
            "active",
            True,
            "email",
        )
        assert sink.count == 1

        worker = await start_worker("channels", LEASE_S, env)
        try:
            async with asyncio.timeout(20):
                # Another process writes the database: there is no event to wait on.
                while (await store.get_fallback(nid) or {}).get("status") == "active":  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await worker.stop(signal.SIGTERM)
        final = await store.get_fallback(nid)
        assert final is not None
        assert final["status"] == "delivered", worker.printed()
        assert sink.count == 2, "email again: the one channel that may have had it"
        assert fcm_standin.sends == [], "never a channel past the one that sent it"
        decided = [(d["kind"], d["decision"]) for d in json.loads(final["decisions_json"])]
        assert decided[-2:] == [("email", "resumed"), ("email", "delivered")]
    finally:
        controller.stop()


async def _quiet_from(
    engine: AsyncEngine, project: str, user: str, start: datetime, minutes: int
) -> datetime:
    """Quiet hours (UTC) from ``start`` (a whole minute) for ``minutes``; their end."""
    first = start.hour * 60 + start.minute
    await PolicyStore(engine).put_quiet_hours(
        project, user, timezone="UTC", start=first, end=(first + minutes) % 1440, now=start
    )
    return start + timedelta(minutes=minutes)


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


async def test_fallback_waits_out_quiet_hours(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """
    Push keeps failing; the move to email falls inside the user's quiet hours, so
    it waits until they end (the row holds that instant), then email goes.
    """
    for _ in range(5):
        fcm_standin.script.append(fcm_error(503, "UNAVAILABLE", "The service is unavailable."))
    start = clock.now()
    opening = await _quiet_from(engine, project, U, _minute(start + timedelta(minutes=8)), 120)
    nid = await _message(engine, project, clock, 1)
    await worker.fan_out([nid])
    clock.advance(SCHEDULE[1])
    await worker.sweep()
    clock.advance(SCHEDULE[2])  # both push retries before the quiet hours
    await worker.sweep()
    assert len(fcm_standin.sends) == 3
    clock.set(start + DELAY)  # push's time is up, inside the quiet hours
    await worker.sweep()
    assert plain_smtp.sink.count == 0, "no email inside quiet hours"
    row = await store.get_fallback(nid)
    assert row is not None
    assert (row["status"], row["next_attempt_at"], row["sending"]) == ("active", opening, False)
    clock.set(opening - timedelta(seconds=1))
    await worker.sweep()
    assert plain_smtp.sink.count == 0
    clock.set(opening)
    assert (await worker.sweep()).sent == 1
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]
    assert twilio_standin.send_count == 0
    assert (await _decisions(store, nid))[-4:] == [
        ("fcm", "waiting"),
        ("fcm", "quiet_hours"),
        ("email", "fallback"),
        ("email", "delivered"),
    ]


async def test_an_advanced_pairs_fallback_waits_out_quiet_hours_on_its_clock(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """
    The pair's clock is five hours ahead: its quiet hours start eight minutes from
    now on that clock, so the move to email waits, and until their end in real time.
    """
    ahead = timedelta(hours=5)
    for _ in range(5):
        fcm_standin.script.append(fcm_error(503, "UNAVAILABLE", "The service is unavailable."))
    start = clock.now()
    async with engine.begin() as conn:
        await conn.execute(
            OFFSETS.insert().values(
                project_id=project,
                agent_id=A,
                user_id=U,
                offset_s=ahead.total_seconds(),
                updated_at=start,
            )
        )
    on_its_clock = _minute(start + ahead + timedelta(minutes=8))
    opening = await _quiet_from(engine, project, U, on_its_clock, 120) - ahead
    nid = await _message(engine, project, clock, 1)
    await worker.fan_out([nid])
    clock.advance(SCHEDULE[1])
    await worker.sweep()
    clock.advance(SCHEDULE[2])
    await worker.sweep()
    clock.set(start + DELAY)  # inside the quiet hours on the pair's clock only
    await worker.sweep()
    assert plain_smtp.sink.count == 0, "no email inside the pair's quiet hours"
    row = await store.get_fallback(nid)
    assert row is not None
    assert (row["status"], row["next_attempt_at"]) == ("active", opening)
    clock.set(opening)
    assert (await worker.sweep()).sent == 1
    assert twilio_standin.send_count == 0


async def test_quiet_hours_wait_stops_at_the_deadline(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """A message whose deadline comes before the quiet hours end waits until it, then stops."""
    fcm_standin.script.append(fcm_error(400, "INVALID_ARGUMENT", "bad", "INVALID_ARGUMENT"))
    start = clock.now()
    await _quiet_from(engine, project, U, _minute(start), 120)
    deadline = start + timedelta(minutes=30)
    row = {**notification(project, A, U, 1, start), "expires_at": deadline}
    await add_notifications(engine, [row])
    nid = str(row["id"])
    await worker.fan_out([nid])  # push fails for good: email is due at once, in quiet hours
    await worker.sweep()
    assert plain_smtp.sink.count == 0
    waiting = await store.get_fallback(nid)
    assert waiting is not None
    assert waiting["next_attempt_at"] == deadline
    clock.set(deadline)
    await worker.sweep()
    clock.advance(timedelta(hours=3))
    await worker.sweep()
    assert plain_smtp.sink.count == 0
    assert twilio_standin.send_count == 0
    final = await store.get_fallback(nid)
    assert final is not None
    assert (final["status"], final["next_attempt_at"]) == ("stopped", None)


async def test_a_step_cut_short_in_quiet_hours_resumes_on_its_channel_after(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    fcm_standin: FcmStandIn,
    twilio_standin: TwilioStandIn,
) -> None:
    """
    A worker dies mid-email; its lease runs out inside quiet hours: the row waits
    and still remembers the cut-short send, so email (not SMS) goes at their end.
    """
    fcm_standin.script.append(fcm_error(400, "INVALID_ARGUMENT", "bad", "INVALID_ARGUMENT"))
    nid = await _message(engine, project, clock, 1)
    await worker.fan_out([nid])
    (row,) = await store.claim_due_fallbacks(
        clock.now(), lease=timedelta(minutes=2), limit=10, token="chw_dead"
    )
    step = FallbackStep(
        "active", 1, 1, clock.now() + DELAY, row["next_attempt_at"], row["decisions_json"]
    )
    assert await store.begin_fallback_step(nid, "chw_dead", step, now=clock.now())
    opening = await _quiet_from(engine, project, U, _minute(clock.now()), 60)
    clock.advance(DELAY + timedelta(minutes=1))  # the lease and email's time are over
    await worker.sweep()
    assert plain_smtp.sink.count == 0
    waiting = await store.get_fallback(nid)
    assert waiting is not None
    assert (waiting["next_attempt_at"], waiting["sending"]) == (opening, True)
    clock.set(opening)
    assert (await worker.sweep()).sent == 1
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]
    assert twilio_standin.send_count == 0
    assert (await _decisions(store, nid))[-3:] == [
        ("email", "quiet_hours"),
        ("email", "resumed"),
        ("email", "delivered"),
    ]


async def test_a_retry_waits_out_quiet_hours(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    fcm_standin: FcmStandIn,
) -> None:
    """One channel (no fallback): a push retry due in quiet hours is attempted at their end."""
    user = "user-push-only"
    await store.add_contact(
        project, A, user, kind="fcm", destination=TOKEN, opted_out=False, now=clock.now()
    )
    fcm_standin.script.append(fcm_error(503, "UNAVAILABLE", "The service is unavailable."))
    row = notification(project, A, user, 1, clock.now())
    await add_notifications(engine, [row])
    nid = str(row["id"])
    assert (await worker.fan_out([nid])).retries_scheduled == 1
    opening = await _quiet_from(engine, project, user, _minute(clock.now()), 30)
    clock.advance(SCHEDULE[1])
    await worker.sweep()
    assert len(fcm_standin.sends) == 1, "no retry inside quiet hours"
    (queued,) = [
        r
        for r in await store.list_attempts(project, A, user, notification_id=nid, limit=10)
        if r["next_attempt_at"] is not None
    ]
    assert queued["next_attempt_at"] == opening
    clock.set(opening)
    assert (await worker.sweep()).sent == 1
    assert len(fcm_standin.sends) == 2


async def test_retries_in_a_project_without_quiet_hours_read_them_once(
    engine: AsyncEngine,
    project: str,
    store: ChannelStore,
    worker: ChannelsWorker,
    clock: ManualClock,
    fcm_standin: FcmStandIn,
) -> None:
    """
    Whether a project has quiet hours is read once per project for a while, as the
    dispatcher reads it: three retries of a project where nobody has quiet hours
    cost one read of them, not one each.
    """
    nids = []
    for n in range(3):
        user = f"user-retry-{n}"
        await store.add_contact(
            project, A, user, kind="fcm", destination=TOKEN, opted_out=False, now=clock.now()
        )
        fcm_standin.script.append(fcm_error(503, "UNAVAILABLE", "The service is unavailable."))
        row = notification(project, A, user, n, clock.now())
        await add_notifications(engine, [row])
        nids.append(str(row["id"]))
    assert (await worker.fan_out(nids)).retries_scheduled == 3
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "user_quiet_hours" in statement:
            statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        clock.advance(SCHEDULE[1])
        assert (await worker.sweep()).sent == 3
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)
    assert len(fcm_standin.sends) == 6
    assert len(statements) == 1, statements


def test_quiet_wait_is_the_dispatchers_opening_across_dst() -> None:
    """
    22:00-07:30 in New York on the spring-forward night: a send due at 03:30 EDT waits
    until 07:30 EDT (11:30Z, not 12:30Z); one due outside sends now; a deadline caps it.
    """
    quiet = QuietHours("America/New_York", 22 * 60, 7 * 60 + 30)
    due = datetime(2027, 3, 14, 7, 30, tzinfo=UTC)  # 03:30 EDT, after the jump
    assert quiet_wait(quiet, due, None) == datetime(2027, 3, 14, 11, 30, tzinfo=UTC)
    assert quiet_wait(quiet, due, None) == quiet.next_opening(due)
    assert quiet_wait(quiet, datetime(2027, 3, 14, 16, 0, tzinfo=UTC), None) is None
    cap = datetime(2027, 3, 14, 9, 0, tzinfo=UTC)
    assert quiet_wait(quiet, due, cap) == cap
    assert quiet_wait(None, due, cap) is None
