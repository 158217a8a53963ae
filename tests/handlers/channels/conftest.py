"""
Fixtures for channel tests: one RSA key and service account, one uvicorn server hosting
the FCM and Twilio stand-ins, and three aiosmtpd servers (plain, STARTTLS + AUTH, TLS).

Servers live for the session (starting them is the slow part); every test gets them
reset, with a fresh :class:`ManualClock`.
"""

import ipaddress
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from delivery.clock import ManualClock
from handlers.base import Message
from handlers.fanout import provider_http_client
from handlers.fcm import FcmChannel, ServiceAccount
from handlers.sms import SmsChannel
from tests.handlers.channels.standins import (
    FcmStandIn,
    SmtpSink,
    TwilioStandIn,
    app_for,
    free_port,
    serve_in_thread,
)

PROJECT_ID = "demo-project"
CLIENT_EMAIL = "fcm-sender@demo-project.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef0123456789abcdef01234567"
ACCOUNT_SID = "AC" + "0" * 31 + "1"
AUTH_TOKEN = "twilio-auth-token"
SMS_FROM = "+15005550006"
SMTP_USER = "mailer"
SMTP_PASSWORD = "s3cret"


def make_message(**overrides: Any) -> Message:
    """A proactive message with stable ids; fields can be overridden."""
    fields: dict[str, Any] = {
        "event_id": "evt_01JD0000000000000000000001",
        "event_type": "delivery.notification.created",
        "project_id": "default",
        "agent_id": "agent-7",
        "user_id": "user-42",
        "message_id": "msg_01JD0000000000000000000001",
        "check_type": "daily_checkin",
        "intent": "check in",
        "generated_message": "Good morning! How did the interview go?",
        "created_at": datetime(2026, 11, 23, 8, 0, tzinfo=UTC),
    }
    fields.update(overrides)
    return Message(**fields)


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def service_account_info(rsa_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """A service-account key file's content, shaped like the ones Google issues."""
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {
        "type": "service_account",
        "project_id": PROJECT_ID,
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": "https://oauth2.googleapis.com/token",
    }


@pytest.fixture(scope="session")
def providers(
    rsa_key: rsa.RSAPrivateKey,
) -> Iterator[tuple[str, FcmStandIn, TwilioStandIn]]:
    public = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fcm = FcmStandIn(public, CLIENT_EMAIL, PROJECT_ID, KEY_ID)
    twilio = TwilioStandIn(ACCOUNT_SID, AUTH_TOKEN)
    with serve_in_thread(app_for(fcm, twilio)) as url:
        yield url, fcm, twilio


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime.now(UTC).replace(microsecond=0))


@pytest.fixture
def provider_url(providers: tuple[str, FcmStandIn, TwilioStandIn]) -> str:
    return providers[0]


@pytest.fixture
def fcm_standin(
    providers: tuple[str, FcmStandIn, TwilioStandIn], clock: ManualClock
) -> Iterator[FcmStandIn]:
    standin = providers[1]
    standin.reset(clock.now)
    yield standin
    assert standin.problems == [], "the FCM stand-in saw requests the docs do not allow"


@pytest.fixture
def twilio_standin(providers: tuple[str, FcmStandIn, TwilioStandIn]) -> Iterator[TwilioStandIn]:
    standin = providers[2]
    standin.reset()
    yield standin
    assert standin.problems == [], "the Twilio stand-in saw requests the docs do not allow"


@pytest.fixture(params=["aiohttp", "httpx"])
async def http_client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's aiohttp-backed client, and plain httpx: channels must work with both."""
    if request.param == "aiohttp":
        client = provider_http_client(timeout=timedelta(seconds=5))
    else:
        client = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
    async with client:
        yield client


@pytest.fixture
def fcm_channel(
    service_account_info: dict[str, str],
    http_client: httpx.AsyncClient,
    clock: ManualClock,
    provider_url: str,
    fcm_standin: FcmStandIn,
) -> FcmChannel:
    return FcmChannel(
        ServiceAccount.from_json(service_account_info),
        client=http_client,
        clock=clock,
        base_url=provider_url,
        token_url=f"{provider_url}/token",
    )


@pytest.fixture
def sms_channel(
    http_client: httpx.AsyncClient,
    clock: ManualClock,
    provider_url: str,
    twilio_standin: TwilioStandIn,
) -> SmsChannel:
    return SmsChannel(
        ACCOUNT_SID, AUTH_TOKEN, SMS_FROM, client=http_client, clock=clock, base_url=provider_url
    )


# --------------------------------------------------------------------------- SMTP


@dataclass
class SmtpServer:
    """A running aiosmtpd server and what it received."""

    port: int
    sink: SmtpSink


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 / localhost."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    files = TlsFiles(folder / "cert.pem", folder / "key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return files


def _authenticate(
    server: object, session: object, envelope: object, mechanism: str, auth_data: object
) -> AuthResult:
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == SMTP_USER.encode()
        and auth_data.password == SMTP_PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


def _run_smtp(sink: SmtpSink, **smtp_parameters: Any) -> Iterator[SmtpServer]:
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, **smtp_parameters)
    controller.start()
    try:
        yield SmtpServer(port, sink)
    finally:
        controller.stop()


@pytest.fixture(scope="session", params=[False, True], ids=["one-by-one", "pipelining"])
def _plain_smtp(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """A plain relay, once without PIPELINING and once offering it (RFC 2920)."""
    yield from _run_smtp(SmtpSink(pipelining=request.param))


@pytest.fixture(scope="session")
def _starttls_smtp(tls_files: TlsFiles) -> Iterator[SmtpServer]:
    """
    STARTTLS required, and AUTH required (only after TLS), like a submission port; it
    offers PIPELINING, as submission servers do.
    """
    yield from _run_smtp(
        SmtpSink(pipelining=True),
        tls_context=tls_files.server_context(),
        require_starttls=True,
        authenticator=_authenticate,
        auth_required=True,
        auth_require_tls=True,
    )


@pytest.fixture(scope="session")
def _tls_smtp(tls_files: TlsFiles) -> Iterator[SmtpServer]:
    """Implicit TLS from the first byte (RFC 8314), like port 465, offering PIPELINING."""
    yield from _run_smtp(SmtpSink(pipelining=True), ssl_context=tls_files.server_context())


def _fresh(server: SmtpServer) -> SmtpServer:
    server.sink.envelopes.clear()
    server.sink.count = 0
    return server


@pytest.fixture
def plain_smtp(_plain_smtp: SmtpServer) -> SmtpServer:
    return _fresh(_plain_smtp)


@pytest.fixture
def starttls_smtp(_starttls_smtp: SmtpServer) -> SmtpServer:
    return _fresh(_starttls_smtp)


@pytest.fixture
def tls_smtp(_tls_smtp: SmtpServer) -> SmtpServer:
    return _fresh(_tls_smtp)
