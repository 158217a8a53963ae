"""
Email over SMTP with aiosmtplib: one ``multipart/alternative`` message (plain text and
escaped HTML) per send, over a small pool of reused connections.

References: RFC 5321 (SMTP reply codes: 4yz transient, 5yz permanent, section 4.2.1),
RFC 3463 (enhanced status codes: ``5.1.x`` is a bad destination address), RFC 5322
(headers, ``Message-ID`` syntax, section 3.6.4), RFC 3834 (``Auto-Submitted``),
RFC 3207 (STARTTLS) and RFC 8314 (implicit TLS on port 465).

Channel contract: :meth:`SmtpChannel.send` never raises for server or network trouble.
"""

import asyncio
import binascii
import html
import re
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, parseaddr
from enum import StrEnum
from typing import Final, Self, cast

import aiosmtplib
import structlog
from aiosmtplib.protocol import SMTPProtocol

from delivery.clock import Clock
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Message, Outcome, Retry
from handlers.contacts import ContactKind, redact

log = structlog.get_logger(__name__)

#: The subject is the first line of the message, cut to this many characters, unless
#: the payload names one; 78 is RFC 5322's recommended line length (section 2.1.1).
SUBJECT_MAX: Final = 78
# RFC 3463 section 3.2: X.1.XXX is "Addressing Status" (bad mailbox, bad domain, bad
# syntax, null MX ...). Only a permanent one of those condemns the address; a 550 for
# policy or spam reasons does not.
_BAD_ADDRESS = re.compile(r"\b5\.1\.\d{1,3}\b")
#: Connections one channel keeps at most (open at once, busy or idle).
POOL_SIZE: Final = 8
#: A connection is closed after this many messages: some relays cap a session.
MAX_MESSAGES_PER_CONNECTION: Final = 100
#: An idle connection older than this is not reused: servers drop idle sessions
#: (RFC 5321 section 4.5.3.2.7 lets them after 5 minutes; many do sooner).
MAX_IDLE_S: Final = 30.0
#: How often ``SmtpChannel.aclose`` looks whether the sockets it closed are closed.
_CLOSE_POLL_S: Final = 0.005
# RFC 5322 section 3.2.3 atext minus "=" (our escape character) and "/" (some
# archives use Message-IDs as file names).
_MSG_ID_SAFE = re.compile(r"[A-Za-z0-9!#$%&'*+?^_`{|}~\-]")
_MSG_ID_PLAIN = re.compile(r"[A-Za-z0-9!#$%&'*+?^_`{|}~\-]*")


class SmtpSecurity(StrEnum):
    """How the connection is protected (settings ``smtp_security``)."""

    STARTTLS = "starttls"  # plain connect, then STARTTLS, which must succeed (RFC 3207)
    TLS = "tls"  # TLS from the first byte, usually port 465 (RFC 8314)
    PLAIN = "plain"  # no TLS at all: local relays and tests only


def message_id_for(event_id: str, domain: str) -> str:
    """
    The ``Message-ID`` for an event (pure): the same event always gets the same id.

    Retries and redeliveries of one event therefore carry one Message-ID, which mail
    stores and clients use to recognise duplicates. Characters outside RFC 5322 atext
    are escaped as ``=XX`` (hex of each UTF-8 byte), so distinct event ids never
    collide.
    """
    if _MSG_ID_PLAIN.fullmatch(event_id):
        return f"<{event_id}@{domain}>"  # nothing to escape: the usual case
    escaped = "".join(
        ch if _MSG_ID_SAFE.fullmatch(ch) else "".join(f"={b:02X}" for b in ch.encode())
        for ch in event_id
    )
    return f"<{escaped}@{domain}>"


def subject_for(message: Message) -> str:
    """
    A subject line (pure): ``payload["subject"]`` or ``payload["title"]`` when a string,
    else the message's first line cut to :data:`SUBJECT_MAX` characters with "…".
    """
    for key in ("subject", "title"):
        value = message.payload.get(key)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())
    first = " ".join(message.generated_message.strip().splitlines()[:1]).strip()
    if not first:
        return "New message"
    if len(first) <= SUBJECT_MAX:
        return first
    return first[: SUBJECT_MAX - 1].rstrip() + "…"


def _html_body(message: Message, title: str) -> str:
    paragraphs = "".join(
        f"<p>{html.escape(p).replace(chr(10), '<br>')}</p>"
        for p in re.split(r"\n\s*\n", message.generated_message.strip())
        if p
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head><body>{paragraphs}</body></html>"
    )


def build_email(
    message: Message, *, sender: str, recipient: str, date: str, html_title: str = ""
) -> EmailMessage:
    """
    The MIME message for ``message`` (pure given its inputs).

    ``multipart/alternative`` with a ``text/plain`` part (the generated message as is)
    and a ``text/html`` part in which the message is HTML-escaped, so a message that
    contains markup can never inject any. ``Auto-Submitted: auto-generated`` (RFC 3834)
    keeps vacation responders quiet; ``X-Delivery-Event-Id`` carries the event id in
    clear for support staff.
    """
    subject = subject_for(message)
    mail = EmailMessage()
    mail["From"] = sender
    mail["To"] = recipient
    mail["Subject"] = subject
    mail["Date"] = date
    # The sender's domain names the Message-ID (RFC 5322 3.6.4: id-right is a domain we own).
    domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"
    mail["Message-ID"] = message_id_for(message.event_id, domain)
    mail["Auto-Submitted"] = "auto-generated"
    mail["X-Delivery-Event-Id"] = message.event_id
    mail.set_content(message.generated_message)
    mail.add_alternative(_html_body(message, html_title or subject), subtype="html")
    return mail


# A recipient the fast writer puts in ``To:`` verbatim: an ASCII addr-spec of atext
# local part and a domain of letters, digits, dots and hyphens. Anything else (quoted
# local parts, SMTPUTF8 addresses) goes through the stdlib, which knows those rules.
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-]+@[A-Za-z0-9.\-]+")
# A dot-atom address (RFC 5322 section 3.4.1, ASCII): aiosmtplib's quote_address (an
# ``email.utils.parseaddr`` per message, 2% of the channels worker's CPU) gives it back
# in angle brackets unchanged, which a property test checks.
DOT_ATOM_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+)*"
    r"@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*"
)
# Header text sent as is: printable ASCII, and no "=?" that a reader would take for
# the start of an RFC 2047 encoded word.
_PLAIN_TEXT = re.compile(r"[\x20-\x7e]*")
#: RFC 5322 section 2.1.1: lines SHOULD stay within 78 characters (and MUST within 998).
LINE_MAX: Final = 78
_WORD_OVERHEAD = len("=?utf-8?b??=")


def _encoded_words(name: str, value: str) -> str:
    """
    ``value`` as RFC 2047 ``B`` encoded words of UTF-8, one per folded line.

    Each word carries as many whole characters as keep the header's first line
    (``name: word``) within :data:`LINE_MAX`; later lines are shorter. Words are cut
    between characters, never inside one (RFC 2047 section 5: each word must decode on
    its own); a reader joins adjacent words without the folding space.
    """
    budget = min(((LINE_MAX - len(name) - 2 - _WORD_OVERHEAD) // 4) * 3, 45)
    words: list[bytes] = []
    chunk = b""
    for ch in value:
        encoded = ch.encode()
        if len(chunk) + len(encoded) > budget:
            words.append(chunk)
            chunk = b""
        chunk += encoded
    words.append(chunk)
    return "\r\n ".join(
        "=?utf-8?b?" + binascii.b2a_base64(w, newline=False).decode() + "?=" for w in words
    )


def _header(name: str, value: str) -> str:
    """
    One unstructured header line (with CRLF): plain when it fits in :data:`LINE_MAX`
    and reads back as itself, else encoded words (which fold anywhere).
    """
    line = f"{name}: {value}"
    plain = _PLAIN_TEXT.fullmatch(value) and "=?" not in value and value.strip() == value
    if plain and len(line) <= LINE_MAX:
        return line + "\r\n"
    return f"{name}: {_encoded_words(name, value)}\r\n"


def _text_part(subtype: str, text: str) -> bytes:
    """
    A ``text/*`` body part of UTF-8 ``text``, 7-bit clean whatever the server offers.

    Line breaks are normalised as the stdlib's ``set_content`` does (``splitlines``,
    a final line break added). ASCII with short lines goes as ``7bit``; otherwise the
    shorter of quoted-printable and base64 (the stdlib's choice too), so no
    ``8BITMIME`` is needed and no line exceeds 76 characters.
    """
    lines = text.encode().splitlines()
    body = b"\n".join(lines) + b"\n"
    if body.isascii() and max(map(len, lines), default=0) <= LINE_MAX:
        cte, encoded = "7bit", body
    else:
        qp = binascii.b2a_qp(body, istext=True)
        b64 = binascii.b2a_base64(body, newline=False)
        if len(qp) <= len(b64):
            cte, encoded = "quoted-printable", qp if qp.endswith(b"\n") else qp + b"\n"
        else:
            cte = "base64"
            encoded = b"\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + b"\n"
    head = (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n\r\n'
    ).encode()
    return head + encoded.replace(b"\n", b"\r\n")


class MailWriter:
    """
    The bytes of :func:`build_email`'s message, written directly.

    The stdlib ``email`` package (header objects parsed back from strings, a policy-
    driven generator, a copy of the message in ``aiosmtplib.send_message``) was about
    40% of the channels worker's CPU in ``bench/bench_channels_worker.py`` under
    py-spy; writing the same structure here takes about 17 us where the stdlib's
    build and flatten took 1.5 ms for a one-line message (``timeit``; see
    ``tests/handlers/channels/test_mail_writer.py``, which checks the output against
    the stdlib's parser and builder: headers, RFC 2047 subjects, line lengths, CRLF).
    The ``From`` header is folded once by the stdlib. A recipient it cannot write
    plainly (a quoted or non-ASCII address) or a Message-ID longer than a line may be
    makes :meth:`write` return ``None``, and the caller uses the stdlib.

    Args:
        sender: the ``From`` header (``addr`` or ``Name <addr>``).
    """

    def __init__(self, sender: str) -> None:
        probe = EmailMessage()
        probe["From"] = sender
        self._from = SMTP.fold("From", probe["From"])
        self._domain = parseaddr(sender)[1].rpartition("@")[2] or "localhost"

    def write(
        self, message: Message, *, recipient: str, date: str, html_title: str = ""
    ) -> bytes | None:
        """The message's bytes (CRLF line ends), or ``None`` for the stdlib to write."""
        if not _PLAIN_ADDRESS.fullmatch(recipient) or len(recipient) > LINE_MAX - 4:
            return None
        subject = subject_for(message)
        message_id = message_id_for(message.event_id, self._domain)
        if len(message_id) > 998 - len("Message-ID: "):
            return None  # cannot fold: the stdlib decides what to do
        variable = [
            _header("Subject", subject),
            _header("X-Delivery-Event-Id", message.event_id),
        ]
        plain = _text_part("plain", message.generated_message)
        rich = _text_part("html", _html_body(message, html_title or subject))
        boundary = "===============" + secrets.token_hex(12) + "=="
        marker = b"--" + boundary.encode()
        if marker in plain or marker in rich:
            return None  # 7bit text holding a random 24-hex token: never, but exact
        head = (
            f"{self._from}To: {recipient}\r\n{variable[0]}Date: {date}\r\n"
            f"Message-ID: {message_id}\r\nAuto-Submitted: auto-generated\r\n"
            f"{variable[1]}MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/alternative;\r\n boundary="{boundary}"\r\n\r\n'
        ).encode()
        # The CRLF before each delimiter belongs to the delimiter (RFC 2046 section
        # 5.1.1), so each part's own last line break is kept, as the stdlib writes it.
        crlf = b"\r\n"
        parts = [head, marker, crlf, plain, crlf, marker, crlf, rich, crlf, marker, b"--", crlf]
        return b"".join(parts)


def classify_smtp_error(exc: Exception) -> Retry | Failed:
    """
    Map an aiosmtplib error to an outcome (pure), per RFC 5321 section 4.2.1.

    * A reply code 4yz, a timeout, a refused or dropped connection -> ``Retry``.
    * A reply code 5yz -> ``Failed``; when the recipient was refused with an RFC 3463
      ``5.1.x`` addressing status (no such mailbox or domain) the address is dead ->
      ``disable_destination=True``.
    * A missing capability (no STARTTLS when it is required, no AUTH) -> ``Failed``: a
      configuration problem, which retrying does not fix (and STARTTLS is never
      silently skipped).
    """
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        # Single-recipient sends raise SMTPRecipientRefused, but be exhaustive.
        exc = exc.recipients[0] if exc.recipients else aiosmtplib.SMTPException(str(exc))
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        reason = f"smtp {exc.code}: {exc.message}"
        if 400 <= exc.code < 500:
            return Retry(reason, exc.code)
        dead = isinstance(exc, aiosmtplib.SMTPRecipientRefused) and bool(
            _BAD_ADDRESS.search(exc.message)
        )
        if 500 <= exc.code < 600:
            return Failed(reason, exc.code, disable_destination=dead)
        return Retry(reason, exc.code)
    if isinstance(
        exc,
        aiosmtplib.SMTPServerDisconnected
        | aiosmtplib.SMTPConnectError
        | aiosmtplib.SMTPTimeoutError,
    ):
        return Retry(f"smtp unreachable: {exc!r}")
    if isinstance(exc, aiosmtplib.SMTPException):
        # SMTPNotSupported and aiosmtplib's bare SMTPException ("STARTTLS extension not
        # supported by server", "No recipients") are protocol or configuration problems.
        return Failed(f"smtp server cannot do what we need: {exc.message}")
    # Refused connections, resets and TLS handshake errors (ssl.SSLError is an OSError).
    return Retry(f"smtp unreachable: {exc!r}")


# RFC 5321 section 4.5.2 (transparency) and 2.3.8 (CRLF only), as aiosmtplib's DATA
# writes them: every line break made CRLF, a period that starts a line doubled.
_LINE_ENDS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")
_LEADING_PERIOD = re.compile(rb"(?m)^\.")


def data_content(mail: bytes) -> bytes:
    """
    ``mail`` as DATA sends it (pure): line breaks made CRLF, a period that starts a
    line doubled, a final CRLF, then the ``.`` line that ends the data.

    The bytes are exactly those of ``aiosmtplib``'s ``execute_data_command``. Its two
    regular expressions cost about 30 us for a small message (``timeit``); a message
    whose line breaks are all CRLF already (what :class:`MailWriter` writes) takes
    the counting shortcut instead.
    """
    crlf = mail.count(b"\r\n")
    if mail.count(b"\n") == crlf and mail.count(b"\r") == crlf:
        if mail.startswith(b".") or b"\n." in mail:
            mail = _LEADING_PERIOD.sub(b"..", mail)
    else:
        mail = _LEADING_PERIOD.sub(b"..", _LINE_ENDS.sub(b"\r\n", mail))
    if not mail.endswith(b"\r\n"):
        mail += b"\r\n"
    return mail + b".\r\n"


class _Replies(asyncio.Protocol):
    """
    One transaction's replies on a pooled aiosmtplib connection, in the order they come.

    For the transaction this object is the transport's protocol (``set_protocol``), and
    aiosmtplib's is put back by :meth:`close`. aiosmtplib's protocol keeps one reply
    waiter and drops the bytes that arrive while that waiter is answered, so it cannot
    take the replies of pipelined commands (RFC 2920), which may come in one segment, or
    in two that the loop reads back to back before the reader runs; this keeps every
    reply. The bytes are parsed by aiosmtplib's own reply parser over its protocol's
    buffer (private names: the version is pinned in ``constraints.txt``, and every SMTP
    test goes through here); the connection's loss, an EOF and flow control are handed on
    to aiosmtplib's protocol, so the client sees them as it would have. A timeout, a
    dropped connection or a malformed reply raises as aiosmtplib's ``read_response``
    would (``SMTPReadTimeoutError``, ``SMTPServerDisconnected``,
    ``SMTPResponseException``). One timer serves the transaction, re-armed as each
    awaited reply moves the deadline, so every reply still gets ``timeout_s``.
    """

    def __init__(self, client: aiosmtplib.SMTP, timeout_s: float) -> None:
        smtp = client.protocol
        transport = None if smtp is None else smtp.transport
        if smtp is None or transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._smtp = smtp
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    def write(self, data: bytes) -> None:
        """Write ``data`` (commands, or the message); ``SMTPServerDisconnected`` when closing."""
        self._smtp.write(data)

    async def next(self) -> aiosmtplib.SMTPResponse:
        """The next reply, within ``timeout_s`` of this call."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._deadline = self._loop.time() + self._timeout_s
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline, self._expire)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def data_received(self, data: bytes) -> None:
        """Every complete reply in the bytes so far, queued (asyncio's callback)."""
        smtp = self._smtp
        smtp._buffer.extend(data)
        try:
            while (reply := smtp._read_response_from_buffer()) is not None:
                self._replies.append(reply)
        except aiosmtplib.SMTPResponseException as exc:  # malformed or overlong
            self._fail(exc)
        self._wake()

    def eof_received(self) -> bool:
        """The server closed its side (asyncio's callback): the transport closes."""
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return self._smtp.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket is closed (asyncio's callback); aiosmtplib's protocol is told too."""
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self._smtp.connection_lost(exc)

    def pause_writing(self) -> None:
        """Flow control, for aiosmtplib's protocol (asyncio's callback)."""
        self._smtp.pause_writing()

    def resume_writing(self) -> None:
        """Flow control, for aiosmtplib's protocol (asyncio's callback)."""
        self._smtp.resume_writing()

    def close(self) -> None:
        """
        The transaction is over, answered or not: cancel the timer and give the
        connection back to aiosmtplib's protocol. Bytes nobody asked for are dropped,
        as aiosmtplib drops a reply that comes without a command.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._replies.clear()
        self._smtp._buffer.clear()
        if self._transport.get_protocol() is self:
            self._transport.set_protocol(self._smtp)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:
        self._timer = None
        if self._loop.time() < self._deadline:
            # A later reply moved the deadline: wait for that one instead.
            self._timer = self._loop.call_at(self._deadline, self._expire)
            return
        if self._waiter is not None and not self._waiter.done():
            self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"))


@dataclass(slots=True)
class _Connection:
    """A pooled SMTP session: how many messages it carried, since when it is idle."""

    client: aiosmtplib.SMTP
    sent: int = 0
    idle_since: float = 0.0
    size: bool = False
    """The server takes ``SIZE`` on MAIL (RFC 1870), as its EHLO said."""
    pipelining: bool = False
    """The server takes MAIL, RCPT and DATA in one write (RFC 2920), as its EHLO said."""


class SmtpChannel:
    """
    :class:`~handlers.base.Channel` for email addresses (``ContactKind.EMAIL``).

    Sends share a pool of at most ``pool_size`` connections to the one server: a send
    takes an idle connection (or opens one, with STARTTLS/TLS and AUTH as configured),
    sends one message on it and puts it back, so a burst of mail costs a handful of
    handshakes instead of one per message; sends beyond the bound wait for a
    connection. A connection that failed in any way is closed, never reused; one idle
    for :data:`MAX_IDLE_S` or used for :data:`MAX_MESSAGES_PER_CONNECTION` messages is
    closed too. When the server dropped an idle connection (it disconnects, or
    answers 421, on the first command), the message goes once more on a fresh one.
    :meth:`aclose` closes the idle connections and waits until every socket the channel
    closed is closed (a TLS close takes a round trip with the server).

    Args:
        host: SMTP server.
        port: its port (587 for STARTTLS, 465 for TLS, 25 for plain relays).
        sender: the ``From`` header, ``addr`` or ``Name <addr>``; ``addr`` is also the
            envelope sender and its domain names the ``Message-ID``.
        clock: for the ``Date`` header.
        security: see :class:`SmtpSecurity`.
        username: when set, AUTH with ``password`` after TLS is up.
        password: the AUTH password.
        timeout_s: per-operation timeout handed to aiosmtplib.
        tls_context: certificates to trust (tests pass a context that trusts their
            self-signed certificate); ``None`` uses the system store.
        pool_size: the most connections open at once.
        timer: monotonic seconds, for idle ages (tests may pass a fake).

    Raises:
        ValueError: ``sender`` holds no address, or ``pool_size`` is below 1.
    """

    kind: Final = ContactKind.EMAIL

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        *,
        clock: Clock,
        security: SmtpSecurity = SmtpSecurity.STARTTLS,
        username: str = "",
        password: str = "",
        timeout_s: float = 30.0,
        tls_context: ssl.SSLContext | None = None,
        pool_size: int = POOL_SIZE,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        address = parseaddr(sender)[1]
        if "@" not in address:
            raise ValueError(f"SMTP sender must be an address or 'Name <address>'; got {sender!r}")
        if pool_size < 1:
            raise ValueError(f"SMTP pool_size must be at least 1; got {pool_size}")
        self._host = host
        self._port = port
        self._sender = sender
        self._sender_address = address
        quoted = aiosmtplib.email.quote_address(address)
        # A non-ASCII sender needs SMTPUTF8: sendmail's own path, with its checks.
        self._mail_from = b"FROM:" + quoted.encode("ascii") if quoted.isascii() else None
        self._clock = clock
        self._security = SmtpSecurity(security)
        self._username = username or None
        self._password = password if username else None
        self._timeout_s = timeout_s
        self._tls_context = tls_context
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: list[_Connection] = []
        self._closing: list[SMTPProtocol] = []
        """
        Sessions closed whose socket may still be open: closing a TLS session waits for
        the server's close_notify, which :meth:`aclose` waits for in turn.
        """
        self._timer = timer
        self._writer = MailWriter(sender)
        self._date_second: datetime | None = None
        self._date_text = ""

    @classmethod
    def from_settings(
        cls, settings: Settings, *, clock: Clock, tls_context: ssl.SSLContext | None = None
    ) -> Self:
        """
        Build from ``DELIVERY_SMTP_*`` settings.

        Raises:
            ValueError: ``smtp_host`` or ``smtp_from`` is unset or not an address, or
                ``smtp_security`` is not ``starttls``, ``tls`` or ``plain``.
        """
        if not settings.smtp_host or not settings.smtp_from:
            raise ValueError("DELIVERY_SMTP_HOST and DELIVERY_SMTP_FROM must be set")
        try:
            security = SmtpSecurity(settings.smtp_security)
        except ValueError:
            raise ValueError(
                "DELIVERY_SMTP_SECURITY must be starttls, tls or plain; "
                f"got {settings.smtp_security!r}"
            ) from None
        return cls(
            settings.smtp_host,
            settings.smtp_port,
            settings.smtp_from,
            clock=clock,
            security=security,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else "",
            tls_context=tls_context,
            pool_size=settings.smtp_pool_size,
        )

    async def send(self, message: Message, destination: str) -> Outcome:
        """
        Mail ``message`` to ``destination`` (a normalised address).

        Returns ``Delivered(250)`` once the server accepted the DATA. Never raises for
        SMTP or network errors.
        """
        date = self._date(self._clock.now())
        mail: EmailMessage | bytes | None = self._writer.write(
            message, recipient=destination, date=date
        )
        if mail is None:
            mail = build_email(message, sender=self._sender, recipient=destination, date=date)
        try:
            async with self._slots:
                reply = await self._send_pooled(mail, destination)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            outcome = classify_smtp_error(exc)
            log.warning(
                "email.send.failed",
                event_id=message.event_id,
                to=redact(self.kind, destination),
                outcome=type(outcome).__name__,
                status_code=outcome.status_code,
                reason=outcome.reason,
            )
            return outcome
        return Delivered(250, reply)

    def _date(self, now: datetime) -> str:
        """The ``Date`` header for ``now``, written once a second (it has no finer unit)."""
        second = now.replace(microsecond=0)
        if second != self._date_second:
            self._date_second = second
            self._date_text = format_datetime(second)
        return self._date_text

    async def aclose(self) -> None:
        """
        Close the idle connections (QUIT, then the socket) and return once every socket
        this channel closed is closed; sends may still open new ones.

        A TLS session's socket closes only after the server's close_notify comes back:
        without the wait, a loop that ends right after (the worker's shutdown, a test)
        would leave it open, for the garbage collector to find. A server that does not
        answer within ``min(timeout_s, 5)`` seconds has its sockets dropped.
        """
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._quit(connection)
        # Looked at every few milliseconds: aiosmtplib's protocol has no future that
        # its connection_lost resolves.
        for _ in range(int(min(self._timeout_s, 5.0) / _CLOSE_POLL_S)):
            if not self._still_closing():
                return
            await asyncio.sleep(_CLOSE_POLL_S)
        if self._still_closing():
            for protocol in self._closing:
                if protocol.transport is not None:
                    # A stream socket's transport (uvloop's does not subclass asyncio's).
                    cast(asyncio.Transport, protocol.transport).abort()
            self._closing = []
            await asyncio.sleep(0)  # the aborts finish on the loop's next pass

    def _still_closing(self) -> bool:
        # aiosmtplib's flag (the version is pinned): its protocol's connection_lost ran,
        # and the socket is closed.
        self._closing = [p for p in self._closing if not p._connection_lost]
        return bool(self._closing)

    def _close(self, client: aiosmtplib.SMTP) -> None:
        """Close ``client``'s session now; :meth:`aclose` waits for its socket."""
        protocol = client.protocol
        client.close()
        if protocol is not None and not protocol._connection_lost:
            self._still_closing()  # forgets the ones closed since: the list stays short
            self._closing.append(protocol)

    async def _send_pooled(self, mail: EmailMessage | bytes, destination: str) -> str:
        """One message on a pooled connection (the caller holds a slot)."""
        connection = self._take_idle()
        reused = connection is not None
        if connection is None:
            connection = await self._connect()
        try:
            reply = await self._send_on(connection, mail, destination)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPResponseException) as exc:
            self._discard(connection)
            stale = isinstance(exc, aiosmtplib.SMTPServerDisconnected) or exc.code == 421
            if not (reused and stale):
                raise
            # A reused session the server ended, almost always while it sat idle:
            # once more on a fresh connection, now rather than at the caller's retry
            # (a drop after DATA could mean a second copy, as that retry would; both
            # carry one Message-ID, which mail stores use to spot duplicates).
            log.debug("email.pool.stale_connection", host=self._host, error=repr(exc))
            connection = await self._connect()
            try:
                reply = await self._send_on(connection, mail, destination)
            except BaseException:
                self._discard(connection)
                raise
        except BaseException:
            # Timed out, cancelled, refused: the session's state is unknown.
            self._discard(connection)
            raise
        connection.sent += 1
        if connection.sent >= MAX_MESSAGES_PER_CONNECTION:
            await self._quit(connection)
        else:
            connection.idle_since = self._timer()
            self._idle.append(connection)
        return reply

    async def _send_on(
        self, connection: _Connection, mail: EmailMessage | bytes, destination: str
    ) -> str:
        if isinstance(mail, bytes) and self._mail_from is not None:
            # 7-bit clean and ASCII-addressed (MailWriter): no SMTPUTF8 or 8BITMIME needed.
            return await self._transaction(connection, mail, self._mail_from, destination)
        if isinstance(mail, bytes):
            _, reply = await connection.client.sendmail(self._sender_address, [destination], mail)
        else:
            _, reply = await connection.client.send_message(
                mail, sender=self._sender_address, recipients=[destination]
            )
        return reply

    async def _transaction(
        self, connection: _Connection, mail: bytes, mail_from: bytes, destination: str
    ) -> str:
        """
        MAIL, RCPT and DATA for one recipient, as ``aiosmtplib.SMTP.sendmail`` sends
        them (``SIZE`` when offered) and with its errors, minus its per-call work: the
        sender quoted once per channel rather than parsed by ``email.utils`` for every
        message, no extension checks or lock per message (a pooled connection carries
        one transaction at a time, after its EHLO). No RSET after a refusal: the caller
        discards a connection whose transaction failed.

        When the server's EHLO offered PIPELINING (RFC 2920), MAIL, RCPT and DATA go in
        one write and their replies are read in order; the message follows DATA's 354
        as before. Otherwise each command waits for the reply to the one before. The
        replies are read by :class:`_Replies` rather than through ``execute_command``,
        whose lock, command wrapper and ``asyncio.wait_for`` per reply, with the DATA
        regexes, were about a fifth of the ~285 us of worker CPU an email cost, and
        which cannot read pipelined replies (``bench/README.md``).
        """
        size = b" SIZE=%d" % len(mail) if connection.size else b""
        if DOT_ATOM_ADDRESS.fullmatch(destination):
            to = b"TO:<" + destination.encode("ascii") + b">"  # what quote_address writes
        else:
            to = b"TO:" + aiosmtplib.email.quote_address(destination).encode("ascii")
        mail_command = b"MAIL " + mail_from + size + b"\r\n"
        rcpt_command = b"RCPT " + to + b"\r\n"
        pipelining = connection.pipelining
        replies = _Replies(connection.client, self._timeout_s)
        try:
            if pipelining:
                # One write and one wake-up for the three commands; the message itself
                # still waits for DATA's 354, as RFC 2920 requires.
                replies.write(mail_command + rcpt_command + b"DATA\r\n")
            else:
                replies.write(mail_command)
            reply = await replies.next()
            if reply.code != 250:
                raise aiosmtplib.SMTPSenderRefused(reply.code, reply.message, self._sender_address)
            if not pipelining:
                replies.write(rcpt_command)
            reply = await replies.next()
            if reply.code not in (250, 251):
                refused = aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, destination)
                raise aiosmtplib.SMTPRecipientsRefused([refused])
            if not pipelining:
                replies.write(b"DATA\r\n")
            reply = await replies.next()
            if reply.code != 354:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
            replies.write(data_content(mail))
            reply = await replies.next()
            if reply.code != 250:
                raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        finally:
            replies.close()
        return reply.message

    def _take_idle(self) -> _Connection | None:
        """The most recently used idle connection still fit for use, else ``None``."""
        while self._idle:
            connection = self._idle.pop()
            fresh = self._timer() - connection.idle_since < MAX_IDLE_S
            if fresh and connection.client.is_connected:
                return connection
            self._discard(connection)
        return None

    async def _connect(self) -> _Connection:
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            username=self._username,
            password=self._password,
            use_tls=self._security is SmtpSecurity.TLS,
            # True makes STARTTLS mandatory: never fall back to clear text.
            start_tls=self._security is SmtpSecurity.STARTTLS,
            tls_context=self._tls_context,
            timeout=self._timeout_s,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                # As sendmail would before its first transaction (EHLO, HELO for an
                # old server): the transactions of this session check nothing more.
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    if not client.is_connected:
                        raise
                    await client.helo()
        except BaseException:
            self._close(client)
            raise
        return _Connection(
            client,
            size=client.supports_extension("size"),
            pipelining=client.supports_extension("pipelining"),
        )

    async def _quit(self, connection: _Connection) -> None:
        """End a session politely; a server that is gone already just loses the socket."""
        protocol = connection.client.protocol
        try:
            await connection.client.quit(timeout=min(self._timeout_s, 5.0))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            connection.client.close()
        if protocol is not None and not protocol._connection_lost:
            self._still_closing()
            self._closing.append(protocol)

    def _discard(self, connection: _Connection) -> None:
        protocol = connection.client.protocol
        waiter = None if protocol is None else protocol._response_waiter
        if waiter is not None:
            # The close fails the waiter of the next reply ("Connection lost"), which
            # nobody will await; read here, asyncio does not log it as never retrieved
            # when it is collected (after a timed-out transaction, in a cycle with its
            # traceback, before the protocol's own ``__del__`` could read it).
            waiter.add_done_callback(_read_out)
        self._close(connection.client)


def _read_out(waiter: "asyncio.Future[aiosmtplib.SMTPResponse]") -> None:
    """Mark a discarded connection's reply waiter's exception as read."""
    if not waiter.cancelled():
        waiter.exception()
