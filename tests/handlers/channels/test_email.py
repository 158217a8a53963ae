"""SmtpChannel against real aiosmtpd servers: plain, STARTTLS with AUTH, and implicit TLS."""

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator
from email.message import EmailMessage

import aiosmtplib
import psutil
import pytest
import uvloop
from aiosmtplib.protocol import LINE_ENDINGS_REGEX, PERIOD_REGEX
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery.clock import ManualClock
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Retry
from handlers.email import (
    DOT_ATOM_ADDRESS,
    MailWriter,
    SmtpChannel,
    SmtpSecurity,
    classify_smtp_error,
    data_content,
    message_id_for,
    subject_for,
)
from tests.handlers.channels.conftest import (
    SMTP_PASSWORD,
    SMTP_USER,
    SmtpServer,
    TlsFiles,
    make_message,
)
from tests.handlers.channels.standins import free_port

SENDER = "Sonzai <notify@mail.example.com>"
SENDER_ADDRESS = "notify@mail.example.com"
TO = "ada@example.com"


_OPEN: list[SmtpChannel] = []


@pytest.fixture(autouse=True)
async def _close_pools() -> AsyncIterator[None]:
    """Every channel a test built closes its pooled connections, as the worker's stop does."""
    yield
    while _OPEN:
        await _OPEN.pop().aclose()


def _channel(
    server: SmtpServer,
    clock: ManualClock,
    security: SmtpSecurity = SmtpSecurity.PLAIN,
    tls: TlsFiles | None = None,
    **kwargs: str,
) -> SmtpChannel:
    channel = SmtpChannel(
        "127.0.0.1",
        server.port,
        SENDER,
        clock=clock,
        security=security,
        timeout_s=5,
        tls_context=tls.client_context() if tls else None,
        **kwargs,
    )
    _OPEN.append(channel)
    return channel


def _starttls(
    server: SmtpServer, clock: ManualClock, tls: TlsFiles, *, password: str = SMTP_PASSWORD
) -> SmtpChannel:
    """A STARTTLS channel that logs in as ``SMTP_USER`` (with the right password by default)."""
    return _channel(
        server, clock, SmtpSecurity.STARTTLS, tls, username=SMTP_USER, password=password
    )


def _received(server: SmtpServer) -> EmailMessage:
    assert len(server.sink.envelopes) == 1
    raw = server.sink.envelopes[0].original_content
    assert isinstance(raw, bytes)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


async def test_plain_send_delivers_a_multipart_message(
    plain_smtp: SmtpServer, clock: ManualClock
) -> None:
    """The server receives a multipart/alternative mail with both parts and our headers."""
    message = make_message(generated_message="Hi Ada!\n\n<b>Tip</b>: drink water & rest.")

    outcome = await _channel(plain_smtp, clock).send(message, TO)

    assert isinstance(outcome, Delivered)
    assert outcome.status_code == 250
    envelope = plain_smtp.sink.envelopes[0]
    assert envelope.mail_from == SENDER_ADDRESS
    assert envelope.rcpt_tos == [TO]
    mail = _received(plain_smtp)
    assert mail["From"] == SENDER
    assert mail["To"] == TO
    assert mail["Subject"] == "Hi Ada!"
    assert mail["Message-ID"] == "<evt_01JD0000000000000000000001@mail.example.com>"
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["X-Delivery-Event-Id"] == message.event_id
    assert email.utils.parsedate_to_datetime(mail["Date"]) == clock.now()
    assert mail.get_content_type() == "multipart/alternative"
    plain_part, html_part = mail.iter_parts()
    assert plain_part.get_content_type() == "text/plain"
    assert plain_part.get_content().replace("\r\n", "\n").strip() == message.generated_message
    assert html_part.get_content_type() == "text/html"
    html = html_part.get_content()
    assert "<p>&lt;b&gt;Tip&lt;/b&gt;: drink water &amp; rest.</p>" in html
    assert "<b>" not in html
    assert "<title>Hi Ada!</title>" in html


async def test_the_transaction_declares_the_size_the_server_offers(
    plain_smtp: SmtpServer, clock: ManualClock
) -> None:
    """MAIL carries ``SIZE`` (RFC 1870) with the message's length, as sendmail's does."""
    outcome = await _channel(plain_smtp, clock).send(make_message(), TO)

    assert isinstance(outcome, Delivered)
    envelope = plain_smtp.sink.envelopes[0]
    assert envelope.original_content is not None
    assert envelope.mail_options == [f"SIZE={len(envelope.original_content)}"]


async def test_non_ascii_message_and_long_lines_survive(
    plain_smtp: SmtpServer, clock: ManualClock
) -> None:
    """Unicode subjects and bodies and a line over SMTP's 998-octet limit arrive intact."""
    text = "Grüße, Zoë! 🌅 " + "très long " * 150
    outcome = await _channel(plain_smtp, clock).send(make_message(generated_message=text), TO)

    assert isinstance(outcome, Delivered)
    mail = _received(plain_smtp)
    assert mail["Subject"] == subject_for(make_message(generated_message=text))
    plain_part, html_part = mail.iter_parts()
    assert plain_part.get_content().replace("\r\n", "\n").strip() == text.strip()
    assert "Grüße, Zoë! 🌅" in html_part.get_content()
    raw = plain_smtp.sink.envelopes[0].original_content or b""
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


async def test_starttls_with_auth(
    starttls_smtp: SmtpServer, clock: ManualClock, tls_files: TlsFiles
) -> None:
    """STARTTLS is negotiated, then AUTH, then the mail is accepted."""
    channel = _starttls(starttls_smtp, clock, tls_files)

    outcome = await channel.send(make_message(), TO)

    assert isinstance(outcome, Delivered)
    assert _received(starttls_smtp)["To"] == TO


@pytest.mark.parametrize("security", [SmtpSecurity.STARTTLS, SmtpSecurity.TLS])
def test_tls_sends_on_uvloop(
    security: SmtpSecurity,
    starttls_smtp: SmtpServer,
    tls_smtp: SmtpServer,
    clock: ManualClock,
    tls_files: TlsFiles,
) -> None:
    """
    The long-running commands run on uvloop (the tests above on asyncio's loop): the
    upgrade to TLS (``loop.start_tls``), or TLS from the first byte, the login and the
    send work there too, and the channel closes its connections.
    """
    server = starttls_smtp if security is SmtpSecurity.STARTTLS else tls_smtp

    async def send() -> object:
        if security is SmtpSecurity.STARTTLS:
            channel = _starttls(server, clock, tls_files)
        else:
            channel = _channel(server, clock, SmtpSecurity.TLS, tls_files)
        try:
            return await channel.send(make_message(), TO)
        finally:
            await channel.aclose()

    outcome = asyncio.run(send(), loop_factory=uvloop.new_event_loop)

    assert isinstance(outcome, Delivered)
    assert _received(server)["To"] == TO


async def test_starttls_with_wrong_password_fails(
    starttls_smtp: SmtpServer, clock: ManualClock, tls_files: TlsFiles
) -> None:
    """A rejected AUTH (535) is permanent and does not blame the address."""
    channel = _starttls(starttls_smtp, clock, tls_files, password="x")

    outcome = await channel.send(make_message(), TO)

    assert isinstance(outcome, Failed)
    assert outcome.status_code == 535
    assert outcome.disable_destination is False
    assert starttls_smtp.sink.count == 0


async def test_implicit_tls(tls_smtp: SmtpServer, clock: ManualClock, tls_files: TlsFiles) -> None:
    """Security "tls" speaks TLS from the first byte."""
    outcome = await _channel(tls_smtp, clock, SmtpSecurity.TLS, tls_files).send(make_message(), TO)

    assert isinstance(outcome, Delivered)
    assert _received(tls_smtp)["To"] == TO


async def test_starttls_is_never_downgraded(plain_smtp: SmtpServer, clock: ManualClock) -> None:
    """A server that does not offer STARTTLS fails the send rather than going clear-text."""
    outcome = await _channel(plain_smtp, clock, SmtpSecurity.STARTTLS).send(make_message(), TO)

    assert isinstance(outcome, Failed)
    assert "STARTTLS" in outcome.reason
    assert plain_smtp.sink.count == 0


async def test_untrusted_certificate_is_retried_not_sent(
    tls_smtp: SmtpServer, clock: ManualClock
) -> None:
    """A certificate the system store does not trust never carries the mail."""
    outcome = await _channel(tls_smtp, clock, SmtpSecurity.TLS).send(make_message(), TO)

    assert isinstance(outcome, Retry)
    assert tls_smtp.sink.count == 0


async def test_mailbox_busy_is_retried(plain_smtp: SmtpServer, clock: ManualClock) -> None:
    """A 450 at RCPT is transient."""
    outcome = await _channel(plain_smtp, clock).send(make_message(), "busy@example.com")

    assert outcome == Retry("smtp 450: 4.2.1 Mailbox busy, try again later", 450)


async def test_unknown_user_is_failed_and_disabled(
    plain_smtp: SmtpServer, clock: ManualClock
) -> None:
    """550 5.1.1 (no such mailbox) is permanent and disables the address."""
    outcome = await _channel(plain_smtp, clock).send(make_message(), "nouser@example.com")

    assert isinstance(outcome, Failed)
    assert outcome.status_code == 550
    assert outcome.disable_destination is True


async def test_policy_rejection_fails_but_keeps_the_address(
    plain_smtp: SmtpServer, clock: ManualClock
) -> None:
    """550 5.7.1 (policy) is permanent but says nothing about the mailbox."""
    outcome = await _channel(plain_smtp, clock).send(make_message(), "policy@example.com")

    assert isinstance(outcome, Failed)
    assert outcome.disable_destination is False


async def test_connection_refused_is_retried(clock: ManualClock) -> None:
    """Nothing listening is transient."""
    channel = SmtpChannel(
        "127.0.0.1", free_port(), SENDER, clock=clock, security=SmtpSecurity.PLAIN, timeout_s=2
    )

    outcome = await channel.send(make_message(), TO)

    assert isinstance(outcome, Retry)


async def test_duplicates_share_one_message_id(plain_smtp: SmtpServer, clock: ManualClock) -> None:
    """Two sends of one event carry the same Message-ID; another event gets another."""
    channel = _channel(plain_smtp, clock)
    await channel.send(make_message(), TO)
    await channel.send(make_message(), TO)
    await channel.send(make_message(event_id="evt_other"), TO)

    ids = [
        email.message_from_bytes(e.original_content or b"", policy=email.policy.default)[
            "Message-ID"
        ]
        for e in plain_smtp.sink.envelopes
    ]
    assert ids[0] == ids[1] != ids[2]


def test_from_settings(clock: ManualClock) -> None:
    """Settings name host, port, security and credentials; host and sender are required."""
    settings = Settings(
        smtp_host="smtp.example.com",
        smtp_port=465,
        smtp_security="tls",
        smtp_from=SENDER,
        smtp_username="u",
        smtp_password="p",
    )
    assert isinstance(SmtpChannel.from_settings(settings, clock=clock), SmtpChannel)
    with pytest.raises(ValueError, match="DELIVERY_SMTP_HOST"):
        SmtpChannel.from_settings(Settings(), clock=clock)
    with pytest.raises(ValueError, match="starttls"):
        SmtpChannel.from_settings(settings.model_copy(update={"smtp_security": "ssl"}), clock=clock)


def test_sender_without_an_address_is_refused(clock: ManualClock) -> None:
    """A From setting with no address fails at start-up, not on every send."""
    with pytest.raises(ValueError, match="SMTP sender"):
        SmtpChannel("smtp.example.com", 587, "Sonzai", clock=clock)


@pytest.mark.parametrize(
    ("event_id", "expected"),
    [
        ("evt_123", "<evt_123@example.com>"),
        ("a.b:c@d", "<a=2Eb=3Ac=40d@example.com>"),
        ("x=y", "<x=3Dy@example.com>"),
        ("é", "<=C3=A9@example.com>"),
    ],
    ids=["plain", "dots-colons-at", "escape-char-escaped", "non-ascii"],
)
def test_message_id_for(event_id: str, expected: str) -> None:
    """Message-IDs are deterministic, RFC 5322 dot-atom safe, and injective."""
    assert message_id_for(event_id, "example.com") == expected


@pytest.mark.parametrize(
    ("payload", "text", "expected"),
    [
        ({}, "Hello there", "Hello there"),
        ({}, "First line\nsecond line", "First line"),
        ({}, "   ", "New message"),
        ({}, "x" * 100, "x" * 77 + "…"),
        ({"subject": "Your weekly check-in"}, "Hello", "Your weekly check-in"),
        ({"title": "A\nmulti-line\ttitle"}, "Hello", "A multi-line title"),
    ],
    ids=["first-line", "multi-line", "blank", "long", "payload-subject", "title-whitespace"],
)
def test_subject_for(payload: dict[str, str], text: str, expected: str) -> None:
    """The subject is the payload's, else the message's first line, one line, bounded."""
    assert subject_for(make_message(payload=payload, generated_message=text)) == expected


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (aiosmtplib.SMTPRecipientRefused(451, "4.3.0 try later", TO), Retry),
        (aiosmtplib.SMTPSenderRefused(553, "5.7.1 sender rejected", TO), Failed),
        (aiosmtplib.SMTPDataError(552, "5.3.4 message too big"), Failed),
        (aiosmtplib.SMTPDataError(421, "4.7.0 closing"), Retry),
        (aiosmtplib.SMTPServerDisconnected("lost"), Retry),
        (aiosmtplib.SMTPConnectTimeoutError("timeout"), Retry),
        (aiosmtplib.SMTPReadTimeoutError("timeout"), Retry),
        (ConnectionResetError(), Retry),
        (aiosmtplib.SMTPNotSupported("no AUTH"), Failed),
        (
            aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(550, "5.1.2 bad domain", TO)]
            ),
            Failed,
        ),
    ],
    ids=[
        "rcpt-4xx",
        "sender-5xx",
        "data-5xx",
        "data-4xx",
        "disconnected",
        "connect-timeout",
        "read-timeout",
        "reset",
        "not-supported",
        "recipients-refused",
    ],
)
def test_classify_smtp_error(error: Exception, expected: type) -> None:
    """4yz and network trouble retry; 5yz and missing capabilities fail."""
    assert type(classify_smtp_error(error)) is expected


async def test_a_recipient_the_writer_leaves_to_the_stdlib_is_still_sent(
    plain_smtp: SmtpServer, clock: ManualClock
) -> None:
    """A quoted local part goes through the stdlib's builder; the mail arrives whole."""
    quoted = '"ada lovelace"@example.com'
    message = make_message(generated_message="Hi Ada!")

    outcome = await _channel(plain_smtp, clock).send(message, quoted)

    assert isinstance(outcome, Delivered)
    assert plain_smtp.sink.envelopes[0].rcpt_tos == [quoted]
    mail = _received(plain_smtp)
    assert mail["To"] == quoted
    assert mail["Subject"] == "Hi Ada!"
    plain_part, _html_part = mail.iter_parts()
    assert plain_part.get_content().strip() == "Hi Ada!"


@settings(max_examples=500, deadline=None)
@given(address=st.from_regex(DOT_ATOM_ADDRESS, fullmatch=True))
def test_a_dot_atom_address_is_what_quote_address_writes(address: str) -> None:
    """The RCPT path that skips ``quote_address`` writes exactly what it would."""
    assert aiosmtplib.email.quote_address(address) == f"<{address}>"


async def test_lines_that_start_with_a_period_arrive_intact(
    plain_smtp: SmtpServer, clock: ManualClock
) -> None:
    """A line of just ``.`` or starting with one is doubled on the wire, not the end of DATA."""
    text = ".\n.hidden\n..two\nend ."
    outcome = await _channel(plain_smtp, clock).send(make_message(generated_message=text), TO)

    assert isinstance(outcome, Delivered)
    plain_part, _html_part = _received(plain_smtp).iter_parts()
    assert plain_part.get_content().replace("\r\n", "\n").strip() == text


def _aiosmtplib_data(mail: bytes) -> bytes:
    """What aiosmtplib's ``execute_data_command`` writes for ``mail`` (its own regexes)."""
    mail = PERIOD_REGEX.sub(b"..", LINE_ENDINGS_REGEX.sub(b"\r\n", mail))
    return (mail if mail.endswith(b"\r\n") else mail + b"\r\n") + b".\r\n"


@settings(max_examples=500, deadline=None)
@given(mail=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\r\n."])).map(b"".join))
def test_data_content_is_what_aiosmtplib_writes(mail: bytes) -> None:
    """Any bytes, CRLF-clean or not, go out as aiosmtplib's DATA would send them."""
    assert data_content(mail) == _aiosmtplib_data(mail)


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(codec="utf-8")))
def test_data_content_of_the_writers_mail_is_what_aiosmtplib_writes(text: str) -> None:
    """The writer's messages (CRLF only: the counting shortcut) as aiosmtplib's DATA."""
    mail = MailWriter(SENDER).write(
        make_message(generated_message=text), recipient=TO, date="Sun, 01 Mar 2026 09:00:00 +0000"
    )
    assert mail is not None
    assert data_content(mail) == _aiosmtplib_data(mail)


def _sockets_to(server: SmtpServer) -> list[str]:
    """This process's TCP sockets connected to ``server``, whatever their state."""
    return [
        f"{c.laddr} {c.status}"
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == server.port
    ]


async def test_aclose_returns_once_every_tls_socket_is_closed(
    starttls_smtp: SmtpServer, clock: ManualClock, tls_files: TlsFiles
) -> None:
    """
    Closing a TLS session takes a round trip with the server (close_notify both ways):
    ``aclose`` waits for it, for the pooled sessions it ends and for the ones a failed
    send dropped, so no socket outlives the channel when the event loop ends right after
    (the worker's shutdown; a test's teardown, where a socket left to the garbage
    collector fails whichever test is running when it is collected).
    """
    failed = _starttls(starttls_smtp, clock, tls_files, password="x")
    pooled = _starttls(starttls_smtp, clock, tls_files)
    assert isinstance(await failed.send(make_message(), TO), Failed)
    assert isinstance(await pooled.send(make_message(), TO), Delivered)

    await failed.aclose()
    await pooled.aclose()

    assert _sockets_to(starttls_smtp) == []


async def _serve_raw(
    pipelining: bool, chunks: list[bytes], commands: list[bytes]
) -> asyncio.Server:
    """
    A bare SMTP relay that notes each read's bytes and each command. Offering
    PIPELINING, it answers MAIL, RCPT and DATA only once all three are in, with their
    three replies in one write; without it, it answers each command as it comes.
    """

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending = b""

        async def line() -> bytes:
            nonlocal pending
            while b"\r\n" not in pending:
                chunk = await reader.read(65536)
                if not chunk:
                    raise ConnectionResetError("client went away")
                chunks.append(chunk)
                pending += chunk
            head, _, pending = pending.partition(b"\r\n")
            return head

        writer.write(b"220 raw.example ESMTP\r\n")
        await line()  # EHLO
        offer = b"250-PIPELINING\r\n" if pipelining else b""
        writer.write(b"250-raw.example\r\n" + offer + b"250 HELP\r\n")
        try:
            while (command := await line()) != b"QUIT":
                commands.append(command)
                if pipelining:
                    commands.extend([await line(), await line()])
                    writer.write(b"250 sender ok\r\n250 recipient ok\r\n354 go ahead\r\n")
                else:
                    writer.write(b"250 sender ok\r\n")
                    commands.append(await line())
                    writer.write(b"250 recipient ok\r\n")
                    commands.append(await line())
                    writer.write(b"354 go ahead\r\n")
                while await line() != b".":
                    pass
                writer.write(b"250 queued\r\n")
            writer.write(b"221 bye\r\n")
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(session, "127.0.0.1", 0)


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelining"])
async def test_mail_rcpt_and_data_share_a_write_only_when_the_server_offers_pipelining(
    pipelining: bool, clock: ManualClock
) -> None:
    """
    Offered PIPELINING (RFC 2920), the channel writes MAIL, RCPT and DATA at once (the
    relay answers none before all three are in, and answers all three in one segment),
    then the message after the 354; not offered it, one command per reply. Two mails
    on one pooled connection, then its QUIT, work either way.
    """
    chunks: list[bytes] = []
    commands: list[bytes] = []
    server = await _serve_raw(pipelining, chunks, commands)
    port = server.sockets[0].getsockname()[1]
    channel = SmtpChannel(
        "127.0.0.1", port, SENDER, clock=clock, security=SmtpSecurity.PLAIN, timeout_s=2
    )
    try:
        first = await channel.send(make_message(event_id="evt_1"), TO)
        second = await channel.send(make_message(event_id="evt_2"), TO)
        await channel.aclose()
    finally:
        server.close()
        await server.wait_closed()

    assert isinstance(first, Delivered)
    assert isinstance(second, Delivered)
    transaction = [
        b"MAIL FROM:<" + SENDER_ADDRESS.encode() + b">",
        b"RCPT TO:<" + TO.encode() + b">",
        b"DATA",
    ]
    assert commands == transaction * 2
    together = [c for c in chunks if c.startswith(b"MAIL ")]
    assert len(together) == 2
    if pipelining:
        assert all(c == b"\r\n".join(transaction) + b"\r\n" for c in together)
    else:
        assert all(c == transaction[0] + b"\r\n" for c in together)
