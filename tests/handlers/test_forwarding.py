"""
ChannelForwarder behind the real receiver router ("a tenant who runs only the
receiver gets push / email / SMS").

Everything on the wire is real: signed requests to a uvicorn-served receiver, an aiosmtpd
server, and the FCM / Twilio stand-ins of ``tests.handlers.channels.standins`` checking
each request against the providers' documentation. Only the pause between in-process
retries is faked, so no test waits.
"""

import email
import email.policy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from typer.testing import CliRunner

from delivery.clock import SystemClock
from delivery.commands import receiver as receiver_command
from delivery.settings import Settings
from handlers.base import Message, Outcome, Retry
from handlers.contacts import Contact, ContactKind
from handlers.fanout import ChannelRouter, channels_from_settings, provider_http_client
from handlers.forwarding import (
    ChannelForwarder,
    ContactsFileError,
    FileContactDirectory,
    ForwardingIncompleteError,
    message_from_event,
)
from handlers.webhooks.receiver import VerifiedEvent, create_receiver_router
from handlers.webhooks.signing import Scheme, generate_secret, sign
from tests.fixtures.http import ServeApp
from tests.handlers.channels.standins import (
    FcmStandIn,
    SmtpSink,
    TwilioStandIn,
    app_for,
    free_port,
    serve_in_thread,
    twilio_error,
)

SECRET = generate_secret()
PATH = "/webhooks/sonzai"
PROJECT_ID = "demo-project"
CLIENT_EMAIL = "fcm-sender@demo-project.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef0123456789abcdef01234567"
ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "twilio-auth-token"
SMS_FROM = "+15005550006"
TOKEN = "cXk1:APA91b" + "Z" * 40
EMAIL = "ada@example.com"
PHONE = "+14155550100"
OPTED_OUT_PHONE = "+14155550199"
TEXT = "Good morning! How did the interview go?"


@dataclass
class Providers:
    url: str
    fcm: FcmStandIn
    twilio: TwilioStandIn
    smtp_port: int
    sink: SmtpSink
    service_account: dict[str, str]


@pytest.fixture(scope="module")
def _providers() -> Iterator[Providers]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fcm = FcmStandIn(public, CLIENT_EMAIL, PROJECT_ID, KEY_ID)
    twilio = TwilioStandIn(ACCOUNT_SID, AUTH_TOKEN)
    sink = SmtpSink()
    smtp_port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    account = {
        "type": "service_account",
        "project_id": PROJECT_ID,
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    try:
        with serve_in_thread(app_for(fcm, twilio)) as url:
            yield Providers(url, fcm, twilio, smtp_port, sink, account)
    finally:
        controller.stop()


@pytest.fixture
def providers(_providers: Providers) -> Iterator[Providers]:
    """The shared servers, reset; each test ends by checking no request broke the docs."""
    _providers.fcm.reset(lambda: datetime.now(UTC))
    _providers.twilio.reset()
    _providers.sink.envelopes.clear()
    _providers.sink.count = 0
    yield _providers
    assert _providers.fcm.problems == []
    assert _providers.twilio.problems == []


@pytest.fixture
def settings(providers: Providers, tmp_path: Path) -> Settings:
    """All three providers configured the way an operator would, pointing at the fakes."""
    account_file = tmp_path / "service-account.json"
    account_file.write_text(json.dumps(providers.service_account))
    return Settings(
        data_dir=tmp_path,
        fcm_service_account_file=account_file,
        fcm_base_url=providers.url,
        fcm_token_url=f"{providers.url}/token",
        smtp_host="127.0.0.1",
        smtp_port=providers.smtp_port,
        smtp_security="plain",
        smtp_from="Sonzai <notify@mail.example.com>",
        sms_base_url=providers.url,
        sms_account_sid=ACCOUNT_SID,
        sms_auth_token=AUTH_TOKEN,
        sms_from=SMS_FROM,
    )


def write_contacts(path: Path, users: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"users": users}))
    return path


@pytest.fixture
def contacts_file(tmp_path: Path) -> Path:
    return write_contacts(
        tmp_path / "contacts.json",
        [
            {
                "agent_id": "agent-7",
                "user_id": "user-42",
                "contacts": [
                    {"kind": "fcm", "destination": TOKEN},
                    {"kind": "email", "destination": EMAIL},
                    {"kind": "sms", "destination": "+1 (415) 555-0100"},
                    {"kind": "sms", "destination": OPTED_OUT_PHONE, "opted_out": True},
                ],
            }
        ],
    )


@dataclass
class RecordingSleep:
    """Stands in for asyncio.sleep: remembers the pauses, never waits."""

    pauses: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)


class ServerSideForwarder:
    """
    Builds the ChannelForwarder in the server's own lifespan.

    The receiver runs on uvicorn's event loop in another thread, and the provider client
    must be created, used and closed on that loop; this is the same shape as
    ``delivery receiver --contacts``, which builds it inside the served coroutine.
    """

    def __init__(self, settings: Settings, directory: FileContactDirectory, sleep: RecordingSleep):
        self.settings = settings
        self.directory = directory
        self.sleep = sleep
        self.inner: ChannelForwarder | None = None

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        async with provider_http_client(timeout=timedelta(seconds=5)) as client:
            channels = channels_from_settings(self.settings, client=client, clock=SystemClock())
            router = ChannelRouter(channels, send_timeout=timedelta(seconds=5))
            self.inner = ChannelForwarder(router, self.directory, sleep=self.sleep)
            try:
                yield
            finally:
                await router.aclose()

    async def forward(self, event: VerifiedEvent) -> None:
        assert self.inner is not None
        await self.inner.forward(event)


@pytest.fixture
def sleep() -> RecordingSleep:
    return RecordingSleep()


@pytest.fixture
def receiver_url(
    settings: Settings, contacts_file: Path, sleep: RecordingSleep, http_server: ServeApp
) -> str:
    forwarder = ServerSideForwarder(settings, FileContactDirectory.load(contacts_file), sleep)
    app = FastAPI(lifespan=forwarder.lifespan)
    app.include_router(create_receiver_router([SECRET], forwarder=forwarder, path=PATH))
    return http_server(app)


def event_body(event_id: str = "evt_01JD0000000000000000000001", **extra: Any) -> bytes:
    """A notification payload, as the sender serialises it."""
    payload = {
        "event_id": event_id,
        "event_type": "delivery.notification.created",
        "created_at": "2026-11-23T08:00:00Z",
        "project_id": "default",
        "agent_id": "agent-7",
        "user_id": "user-42",
        "message_id": "msg_01JD0000000000000000000001",
        "check_type": "daily_checkin",
        "intent": "check in",
        "generated_message": TEXT,
        **extra,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def post_signed(base_url: str, body: bytes, event_id: str) -> httpx.Response:
    headers = sign(body, msg_id=event_id, secrets=[SECRET], now=datetime.now(UTC))
    headers["content-type"] = "application/json"
    return httpx.post(f"{base_url}{PATH}", content=body, headers=headers, timeout=15)


def test_signed_delivery_reaches_push_email_and_sms_once(
    receiver_url: str, providers: Providers
) -> None:
    """One signed event: one FCM send, one email, one SMS; the opted-out number is skipped;
    replaying the exact request is acknowledged without sending anything again."""
    body = event_body()
    headers = sign(
        body, msg_id="evt_01JD0000000000000000000001", secrets=[SECRET], now=datetime.now(UTC)
    )

    first = httpx.post(f"{receiver_url}{PATH}", content=body, headers=headers, timeout=15)
    replay = httpx.post(f"{receiver_url}{PATH}", content=body, headers=headers, timeout=15)

    assert first.status_code == 200, first.text
    assert first.json()["duplicate"] is False
    assert replay.status_code == 200
    assert replay.json()["duplicate"] is True
    assert [send["message"]["token"] for send in providers.fcm.sends] == [TOKEN]
    assert providers.fcm.sends[0]["message"]["notification"]["body"] == TEXT
    assert [(m["To"], m["Body"]) for m in providers.twilio.messages] == [(PHONE, TEXT)]
    assert providers.twilio.send_count == 1  # the opted-out number never reached Twilio
    assert [e.rcpt_tos for e in providers.sink.envelopes] == [[EMAIL]]
    content = providers.sink.envelopes[0].content
    assert isinstance(content, bytes)
    mail = email.message_from_bytes(content, policy=email.policy.default)
    assert mail["To"] == EMAIL
    plain = mail.get_body(preferencelist=("plain",))
    assert plain is not None
    assert TEXT in plain.get_content()


def test_one_channel_down_does_not_block_the_others_and_redelivery_sends_only_it(
    receiver_url: str, providers: Providers, sleep: RecordingSleep
) -> None:
    """SMS answers 503 to every in-process attempt: push and email still go out, the
    receiver answers 503 so the sender redelivers, and the redelivery (fresh signature,
    same event id) sends the SMS alone."""
    event_id = "evt_sms_down"
    providers.twilio.script.extend(
        twilio_error(503, 20503, "Service unavailable") for _ in range(3)
    )

    down = post_signed(receiver_url, event_body(event_id), event_id)

    assert down.status_code == 503
    assert down.json()["code"] == "FORWARD_FAILED"
    assert providers.twilio.send_count == 3  # bounded in-process retries
    assert len(sleep.pauses) == 2
    assert all(0 < pause <= 2 for pause in sleep.pauses)  # retry timing, capped
    assert len(providers.fcm.sends) == 1
    assert providers.sink.count == 1

    again = post_signed(receiver_url, event_body(event_id), event_id)

    assert again.status_code == 200, again.text
    assert [m["To"] for m in providers.twilio.messages] == [PHONE]
    assert len(providers.fcm.sends) == 1  # not sent twice
    assert providers.sink.count == 1


def test_permanent_failure_is_logged_not_retried(
    receiver_url: str, providers: Providers, sleep: RecordingSleep
) -> None:
    """A number that sent STOP fails permanently: no retry, and the event is acknowledged
    (a redelivery could not help), the other channels delivered."""
    providers.twilio.unsubscribed.add(PHONE)

    response = post_signed(receiver_url, event_body("evt_stop"), "evt_stop")

    assert response.status_code == 200, response.text
    assert providers.twilio.send_count == 1
    assert sleep.pauses == []
    assert len(providers.fcm.sends) == 1
    assert providers.sink.count == 1


def test_event_for_an_unknown_user_is_acknowledged(receiver_url: str, providers: Providers) -> None:
    response = post_signed(receiver_url, event_body("evt_x", user_id="nobody"), "evt_x")

    assert response.status_code == 200
    assert providers.fcm.send_count == providers.twilio.send_count == providers.sink.count == 0


def test_file_directory_rejects_a_malformed_phone_naming_the_entry(tmp_path: Path) -> None:
    path = write_contacts(
        tmp_path / "bad.json",
        [
            {"user_id": "user-1", "contacts": [{"kind": "email", "destination": EMAIL}]},
            {
                "agent_id": "agent-7",
                "user_id": "user-2",
                "contacts": [
                    {"kind": "fcm", "destination": TOKEN},
                    {"kind": "sms", "destination": "555-0100"},
                ],
            },
        ],
    )

    with pytest.raises(ContactsFileError) as caught:
        FileContactDirectory.load(path)

    text = str(caught.value)
    assert str(path) in text
    assert "users[1] (agent 'agent-7', user 'user-2') contacts[1]" in text
    assert "E.164" in text
    assert "'555-0100'" in text


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ([], 'a "users" list'),
        ({"users": [{"contacts": []}]}, "users[0]: user_id"),
        (
            {"users": [{"user_id": "u", "contacts": [{"kind": "pager", "destination": "x"}]}]},
            "kind must be one of",
        ),
        ({"users": [{"user_id": "u", "preferences": {"*": ["fax"]}}]}, "preferences.*"),
        ({"users": [{"user_id": "u"}, {"user_id": "u", "agent_id": "*"}]}, "listed twice"),
    ],
)
def test_file_directory_rejects_bad_entries(document: Any, expected: str) -> None:
    with pytest.raises(ContactsFileError) as caught:
        FileContactDirectory.parse(document)
    assert expected in str(caught.value)


async def test_file_directory_lookup_prefers_the_exact_agent() -> None:
    directory = FileContactDirectory.parse(
        {
            "users": [
                {"user_id": "u", "contacts": [{"kind": "email", "destination": "any@example.com"}]},
                {
                    "agent_id": "a1",
                    "user_id": "u",
                    "contacts": [{"kind": "email", "destination": "Ada@Bücher.example"}],
                    "preferences": {"*": ["email"]},
                },
            ]
        }
    )

    assert await directory.contacts("a1", "u") == [
        Contact(ContactKind.EMAIL, "Ada@xn--bcher-kva.example")
    ]
    assert await directory.preferences("a1", "u") == {"*": frozenset({ContactKind.EMAIL})}
    assert await directory.contacts("a2", "u") == [Contact(ContactKind.EMAIL, "any@example.com")]
    assert await directory.preferences("a2", "u") is None
    assert await directory.contacts("a1", "v") == []


def test_message_from_event_tolerates_missing_fields() -> None:
    signed_at = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    event = VerifiedEvent(
        event_id="evt_1",
        event_type="",
        payload={"event_id": "evt_1", "user_id": "u", "created_at": "not a date", "intent": 3},
        scheme=Scheme.STANDARD,
        signed_at=signed_at,
        raw_body=b"{}",
    )

    message = message_from_event(event)

    assert message.event_id == "evt_1"
    assert message.user_id == "u"
    assert message.agent_id == message.intent == message.generated_message == ""
    assert message.created_at == signed_at


def test_receiver_command_rejects_a_bad_contacts_file(tmp_path: Path) -> None:
    """`delivery receiver --contacts` validates the file before serving anything."""
    path = write_contacts(
        tmp_path / "contacts.json",
        [{"user_id": "user-9", "contacts": [{"kind": "sms", "destination": "+0123"}]}],
    )
    app = typer.Typer()
    app.callback()(lambda: None)
    receiver_command.register(app)

    result = CliRunner().invoke(
        app, ["receiver", "--secret", SECRET], env={"DELIVERY_RECEIVER_CONTACTS": str(path)}
    )

    assert result.exit_code == 2
    assert "users[0]" in result.output
    assert "user-9" in result.output


def test_receiver_command_with_contacts_forwards_and_shuts_down_cleanly(
    providers: Providers, settings: Settings, contacts_file: Path, tmp_path: Path
) -> None:
    """`delivery receiver --contacts` sends through the configured providers, and on
    SIGTERM closes its provider client before the process ends."""
    port = free_port()
    env = {
        **os.environ,
        "DELIVERY_RECEIVER_SECRETS": SECRET,
        "DELIVERY_RECEIVER_CONTACTS": str(contacts_file),
        "DELIVERY_DATA_DIR": str(tmp_path),
        "DELIVERY_FCM_SERVICE_ACCOUNT_FILE": str(settings.fcm_service_account_file),
        "DELIVERY_FCM_BASE_URL": providers.url,
        "DELIVERY_FCM_TOKEN_URL": f"{providers.url}/token",
        "DELIVERY_SMTP_HOST": "127.0.0.1",
        "DELIVERY_SMTP_PORT": str(providers.smtp_port),
        "DELIVERY_SMTP_SECURITY": "plain",
        "DELIVERY_SMTP_FROM": "notify@mail.example.com",
        "DELIVERY_SMS_BASE_URL": providers.url,
        "DELIVERY_SMS_ACCOUNT_SID": ACCOUNT_SID,
        "DELIVERY_SMS_AUTH_TOKEN": AUTH_TOKEN,
        "DELIVERY_SMS_FROM": SMS_FROM,
        "PYTHONWARNINGS": "error::ResourceWarning",
    }
    command = [sys.executable, "-m", "delivery", "receiver", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--log-level", "info"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, f"delivery receiver exited: {proc.communicate()[1]}"
            assert time.monotonic() < deadline, "delivery receiver did not start"
            time.sleep(0.05)

        response = post_signed(base, event_body("evt_cli"), "evt_cli")

        assert response.status_code == 200, response.text
        assert len(providers.fcm.sends) == len(providers.twilio.messages) == 1
        assert providers.sink.count == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    # uvicorn re-raises the signal once it has shut down, lifespan included.
    assert proc.returncode in (0, -signal.SIGTERM), stderr
    assert "receiver.channels_closed" in stderr
    assert "Unclosed" not in stderr
    assert "Traceback" not in stderr


class AlwaysBusy:
    """An SMS channel that always fails transiently, with the given Retry-After."""

    def __init__(self, after: timedelta | None = None) -> None:
        self.after = after
        self.sends = 0

    async def send(self, message: Message, destination: str) -> Outcome:
        self.sends += 1
        return Retry("busy", 503, self.after)


class Clocked:
    """A monotonic timer that only moves when the fake sleep does."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def timer(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def sms_only() -> FileContactDirectory:
    """One user with one phone number."""
    return FileContactDirectory.parse(
        {"users": [{"user_id": "u", "contacts": [{"kind": "sms", "destination": PHONE}]}]}
    )


def verified(event_id: str) -> VerifiedEvent:
    body = event_body(event_id, user_id="u")
    return VerifiedEvent(
        event_id=event_id,
        event_type="delivery.notification.created",
        payload=json.loads(body),
        scheme=Scheme.STANDARD,
        signed_at=datetime.now(UTC),
        raw_body=body,
    )


async def test_a_long_retry_after_is_left_to_the_sender() -> None:
    """A provider asking for more patience than a request has is not retried in-process."""
    busy = AlwaysBusy(after=timedelta(minutes=1))
    clocked = Clocked()
    forwarder = ChannelForwarder(
        ChannelRouter({ContactKind.SMS: busy}),
        sms_only(),
        sleep=clocked.sleep,
        timer=clocked.timer,
    )

    with pytest.raises(ForwardingIncompleteError) as caught:
        await forwarder.forward(verified("evt_long"))

    assert busy.sends == 1
    assert clocked.pauses == []
    assert caught.value.pending == (("sms", "…0100"),)  # redacted, never the full number


async def test_retries_stop_at_the_time_budget() -> None:
    busy = AlwaysBusy()
    clocked = Clocked()
    forwarder = ChannelForwarder(
        ChannelRouter({ContactKind.SMS: busy}),
        sms_only(),
        max_attempts=5,
        max_delay=timedelta(seconds=2),
        budget=timedelta(seconds=3),
        sleep=clocked.sleep,
        timer=clocked.timer,
    )

    with pytest.raises(ForwardingIncompleteError):
        await forwarder.forward(verified("evt_budget"))

    assert clocked.pauses == [2.0]  # a second pause would end past the 3 s budget
    assert busy.sends == 2
