"""
SMS over a Twilio-compatible Messages REST API with httpx, plus the pure GSM-7 / UCS-2
length rules that decide how a message is cut.

References:
    * Create a Message: https://www.twilio.com/docs/messaging/api/message-resource
      (``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, form-encoded, HTTP basic
      auth with the Account SID and Auth Token).
    * Error shape and codes: https://www.twilio.com/docs/usage/twilios-response and
      https://www.twilio.com/docs/api/errors (21211, 21610, 20429, ...).
    * Encoding and segments: 3GPP TS 23.038 (GSM 7-bit default alphabet and extension
      table) and https://www.twilio.com/docs/glossary/what-sms-character-limit.

Channel contract: :meth:`SmsChannel.send` never raises for provider or network trouble.
"""

import base64
from bisect import bisect_right
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Literal, Self
from urllib.parse import quote_plus, urlencode

import httpx
import structlog

from delivery.clock import Clock
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Message, Outcome, Retry
from handlers.classify import classify_exception
from handlers.contacts import ContactKind, redact
from handlers.provider_http import DirectPost
from handlers.retry import parse_retry_after

log = structlog.get_logger(__name__)

# 3GPP TS 23.038 section 6.2.1: the default alphabet (ESC, 0x1B, is left out: it only
# introduces the extension table) and section 6.2.1.1: the extension table, whose
# characters cost two septets (ESC + code).
GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION: Final = frozenset("\f^{}\\[~]|€")

Encoding = Literal["GSM-7", "UCS-2"]


@dataclass(frozen=True, slots=True)
class _Limits:
    single: int  # units in a one-segment message
    multi: int  # units per segment once a User Data Header splits it (6 octets of UDH)


_LIMITS: Final[dict[Encoding, _Limits]] = {
    "GSM-7": _Limits(single=160, multi=153),
    "UCS-2": _Limits(single=70, multi=67),
}
#: Twilio accepts up to 1600 characters but recommends at most 10 segments; past that
#: carriers may drop or reorder parts. We cut to this many by default.
DEFAULT_MAX_SEGMENTS: Final = 10
#: "..." stays in GSM-7 (three septets); "…" (U+2026) is not in GSM-7 and would flip a
#: GSM-7 message into UCS-2, more than halving its capacity.
_ELLIPSIS: Final[dict[Encoding, str]] = {"GSM-7": "...", "UCS-2": "…"}
_WORD_BACKOFF: Final = 20
#: Units every part holds at the least (UCS-2's 67, less one for a pair that is never
#: split): a character costs at most two units in either encoding, and each part but the
#: last is closed only when the next character does not fit, so a text of ``n``
#: characters with ``2 * n <= segments * _SURELY_FITS`` fits ``segments`` parts.
_SURELY_FITS: Final = 67 - 1

# Twilio error codes (https://www.twilio.com/docs/api/errors).
# The number itself is unusable or the person replied STOP: stop sending to it.
_DEAD_NUMBER_CODES: Final = frozenset(
    {
        21211,  # Invalid 'To' Phone Number
        21610,  # Attempt to send to unsubscribed recipient (STOP)
        21614,  # 'To' number is not a valid mobile number
    }
)
_TRANSIENT_CODES: Final = frozenset(
    {
        14107,  # SMS send rate limit exceeded
        20429,  # Too Many Requests
        20500,  # Internal Server Error
        20503,  # Service Unavailable
    }
)


def sms_encoding(text: str) -> Encoding:
    """``GSM-7`` when every character is in the GSM alphabet or its extension, else ``UCS-2``."""
    if all(ch in GSM7_BASIC or ch in GSM7_EXTENSION for ch in text):
        return "GSM-7"
    return "UCS-2"


def _unit_cost(ch: str, encoding: Encoding) -> int:
    if encoding == "GSM-7":
        return 2 if ch in GSM7_EXTENSION else 1
    # UCS-2 on the wire is really UTF-16: characters outside the BMP (most emoji) take a
    # surrogate pair, i.e. two units.
    return 2 if ord(ch) > 0xFFFF else 1


def sms_segments(text: str) -> int:
    """
    How many SMS segments ``text`` takes (pure; an empty text counts as one).

    A message that fits one segment (160 septets / 70 UCS-2 units) is one; otherwise
    parts of 153 / 67 are packed, and, as handsets and Twilio do, an escape pair or a
    surrogate pair is never split across parts, so a part may end one unit short.
    """
    encoding = sms_encoding(text)
    limits = _LIMITS[encoding]
    costs = [_unit_cost(ch, encoding) for ch in text]
    if sum(costs) <= limits.single:
        return 1
    segments, used = 1, 0
    for cost in costs:
        if used + cost > limits.multi:
            segments += 1
            used = 0
        used += cost
    return segments


def fit_sms(text: str, max_segments: int = DEFAULT_MAX_SEGMENTS) -> str:
    """
    ``text`` unchanged when it fits ``max_segments``, else cut to fit with an ellipsis.

    The ellipsis is ``...`` for GSM-7 text (so it stays GSM-7) and ``…`` for UCS-2.
    The cut backs off to the previous space when one is within 20 characters, and
    drops trailing whitespace; otherwise it is at a code point, which may split a
    grapheme cluster such as a multi-code-point emoji (it then renders as its first
    part).

    Raises:
        ValueError: ``max_segments`` is below 1.
    """
    if max_segments < 1:
        raise ValueError("max_segments must be at least 1")
    if 2 * len(text) <= max_segments * _SURELY_FITS:
        # Counting units per character was a few per cent of the channels worker's CPU;
        # a text this short fits whatever its characters are.
        return text
    if sms_segments(text) <= max_segments:
        return text
    ellipsis = _ELLIPSIS[sms_encoding(text)]

    # Segments of prefix+ellipsis grow monotonically with the prefix length, so binary
    # search for the longest prefix that still fits.
    def fits(length: int) -> int:
        return 0 if sms_segments(text[:length].rstrip() + ellipsis) <= max_segments else 1

    longest = bisect_right(range(len(text) + 1), 0, key=fits) - 1
    if longest < len(text) and not text[longest].isspace():
        # Mid-word: back off to the last space when it is close, so the text ends on a
        # whole word; a long unbroken run (a URL) is cut where it is.
        space = text.rfind(" ", max(longest - _WORD_BACKOFF, 0), longest)
        if space > 0:
            longest = space
    return text[:longest].rstrip() + ellipsis


def classify_twilio_error(status_code: int, body: Any, retry_after: timedelta | None) -> Outcome:
    """
    Map a non-2xx Messages answer (``{code, message, more_info, status}``) to an outcome (pure).

    * 21211 / 21614 (invalid or non-mobile ``To``), 21610 (recipient sent STOP) ->
      ``Failed(disable_destination=True)``.
    * HTTP 429 or 5xx, or codes 14107 / 20429 / 20500 / 20503 -> ``Retry`` with
      Retry-After.
    * Anything else (bad credentials 20003, region not enabled 21408, bad ``From``
      21606, ...) -> ``Failed``: a configuration problem, the number stays active.
    """
    code = body.get("code") if isinstance(body, dict) else None
    text = body.get("message", "") if isinstance(body, dict) else ""
    label = f"twilio {code}" if isinstance(code, int) else f"sms http {status_code}"
    reason = f"{label}: {text}" if text else label
    if code in _DEAD_NUMBER_CODES:
        return Failed(reason, status_code, disable_destination=True)
    if code in _TRANSIENT_CODES or status_code == 429 or status_code >= 500:
        return Retry(reason, status_code, retry_after)
    return Failed(reason, status_code)


class SmsChannel:
    """
    :class:`~handlers.base.Channel` for E.164 numbers (``ContactKind.SMS``).

    Args:
        account_sid: the account the message is billed to (the basic-auth user).
        auth_token: its secret (the basic-auth password).
        sender: the ``From`` number in E.164, or a Messaging Service SID (``MG…``), which
            is then sent as ``MessagingServiceSid`` as Twilio documents.
        client: caller-owned httpx client (timeouts are set there).
        clock: for Retry-After dates.
        base_url: API root (settings ``sms_base_url``); tests use a local stand-in.
        max_segments: longer messages are cut by :func:`fit_sms`.
    """

    kind: Final = ContactKind.SMS

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        sender: str,
        *,
        client: httpx.AsyncClient,
        clock: Clock,
        base_url: str = "https://api.twilio.com",
        max_segments: int = DEFAULT_MAX_SEGMENTS,
    ) -> None:
        if max_segments < 1:
            raise ValueError("max_segments must be at least 1")
        self._url = f"{base_url.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Messages.json"
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
        # HTTP basic auth, as httpx.BasicAuth writes it, once for every send.
        self._headers = {
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        self._sender_field = "MessagingServiceSid" if sender.startswith("MG") else "From"
        self._sender = sender
        self._sender_pair = urlencode({self._sender_field: sender})
        self._post = DirectPost(client, self._url)
        self._clock = clock
        self._max_segments = max_segments

    @classmethod
    def from_settings(cls, settings: Settings, *, client: httpx.AsyncClient, clock: Clock) -> Self:
        """
        Build from ``DELIVERY_SMS_*`` settings.

        Raises:
            ValueError: the account SID, auth token or sender is unset.
        """
        if not settings.sms_account_sid or settings.sms_auth_token is None or not settings.sms_from:
            raise ValueError(
                "DELIVERY_SMS_ACCOUNT_SID, DELIVERY_SMS_AUTH_TOKEN and DELIVERY_SMS_FROM "
                "must all be set"
            )
        return cls(
            settings.sms_account_sid,
            settings.sms_auth_token.get_secret_value(),
            settings.sms_from,
            client=client,
            clock=clock,
            base_url=settings.sms_base_url,
        )

    async def send(self, message: Message, destination: str) -> Outcome:
        """
        Text ``message.generated_message`` (cut to ``max_segments``) to ``destination``.

        Success is Twilio's 201 with the Message resource; its ``sid`` becomes
        ``Delivered.detail``. Never raises for network or provider errors.
        """
        form = sms_form(
            destination, self._sender_pair, fit_sms(message.generated_message, self._max_segments)
        )

        def bound() -> Any:
            # Bound only when there is something to log: a bind per send was a few
            # per cent of the channels worker's CPU.
            return log.bind(event_id=message.event_id, to=redact(self.kind, destination))

        try:
            response = await self._post(form, self._headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            outcome = classify_exception(exc)
            bound().warning(
                "sms.send.transport_error", error=repr(exc), outcome=type(outcome).__name__
            )
            return outcome
        body = _json_or_none(response)
        if response.status_code in (200, 201):
            sid = body.get("sid", "") if isinstance(body, dict) else ""
            return Delivered(response.status_code, str(sid))
        outcome = classify_twilio_error(
            response.status_code,
            body,
            parse_retry_after(response.headers.get("Retry-After"), now=self._clock.now()),
        )
        bound().warning(
            "sms.send.failed",
            status_code=response.status_code,
            outcome=type(outcome).__name__,
            reason=outcome.reason if not isinstance(outcome, Delivered) else "",
        )
        return outcome


def sms_form(to: str, sender_pair: str, body: str) -> bytes:
    """
    The form ``urlencode({"To": to, <sender field>: sender, "Body": body})`` writes
    (pure), with the sender's ``field=value`` pair encoded once per channel: the
    whole ``urlencode`` per send was about 2% of the channels worker's CPU.
    """
    return f"To={quote_plus(to)}&{sender_pair}&Body={quote_plus(body)}".encode()


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
