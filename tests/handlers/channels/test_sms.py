"""SmsChannel against the local Twilio stand-in, and the pure GSM-7 / UCS-2 length rules."""

from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery.clock import ManualClock
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Retry
from handlers.sms import (
    SmsChannel,
    classify_twilio_error,
    fit_sms,
    sms_encoding,
    sms_form,
    sms_segments,
)
from tests.handlers.channels.conftest import ACCOUNT_SID, SMS_FROM, make_message
from tests.handlers.channels.standins import Canned, TwilioStandIn, free_port, twilio_error

TO = "+14155550100"


async def test_send_posts_the_documented_form(
    sms_channel: SmsChannel, twilio_standin: TwilioStandIn
) -> None:
    """A send is one form-encoded POST with To, From and Body under basic auth."""
    message = make_message()

    outcome = await sms_channel.send(message, TO)

    assert isinstance(outcome, Delivered)
    assert outcome.status_code == 201
    assert outcome.detail.startswith("SM")
    assert twilio_standin.messages == [
        {"To": TO, "From": SMS_FROM, "Body": message.generated_message}
    ]


async def test_messaging_service_sid_is_sent_as_such(
    http_client: httpx.AsyncClient,
    clock: ManualClock,
    provider_url: str,
    twilio_standin: TwilioStandIn,
) -> None:
    """A sender starting with MG goes out as MessagingServiceSid, not From."""
    service = "MG" + "a" * 32
    channel = SmsChannel(
        ACCOUNT_SID,
        "twilio-auth-token",
        service,
        client=http_client,
        clock=clock,
        base_url=provider_url,
    )

    assert isinstance(await channel.send(make_message(), TO), Delivered)
    assert twilio_standin.messages[0]["MessagingServiceSid"] == service
    assert "From" not in twilio_standin.messages[0]


async def test_long_message_is_cut_to_ten_segments(
    sms_channel: SmsChannel, twilio_standin: TwilioStandIn
) -> None:
    """A 3000-character message goes out as at most 10 GSM-7 segments ending in '...'."""
    outcome = await sms_channel.send(make_message(generated_message="word " * 600), TO)

    assert isinstance(outcome, Delivered)
    body = twilio_standin.messages[0]["Body"]
    assert body.endswith("word...")
    assert sms_segments(body) == 10
    assert len(body) <= 10 * 153


async def test_invalid_number_disables_the_destination(
    sms_channel: SmsChannel, twilio_standin: TwilioStandIn
) -> None:
    """Twilio 21211 (invalid To) is permanent and disables the number."""
    outcome = await sms_channel.send(make_message(), "+1999")

    assert isinstance(outcome, Failed)
    assert outcome.disable_destination is True
    assert outcome.status_code == 400
    assert outcome.reason.startswith("twilio 21211:")


async def test_unsubscribed_recipient_disables_the_destination(
    sms_channel: SmsChannel, twilio_standin: TwilioStandIn
) -> None:
    """Twilio 21610 (the person replied STOP) disables the number."""
    twilio_standin.unsubscribed.add(TO)

    outcome = await sms_channel.send(make_message(), TO)

    assert outcome == Failed(
        "twilio 21610: Attempt to send to unsubscribed recipient", 400, disable_destination=True
    )


async def test_rate_limit_is_retried_after_retry_after(
    sms_channel: SmsChannel, twilio_standin: TwilioStandIn
) -> None:
    """HTTP 429 / Twilio 20429 is a Retry carrying Retry-After."""
    error = twilio_error(429, 20429, "Too Many Requests")
    twilio_standin.script.append(Canned(429, error.body, {"Retry-After": "3"}))

    outcome = await sms_channel.send(make_message(), TO)

    assert outcome == Retry("twilio 20429: Too Many Requests", 429, timedelta(seconds=3))


async def test_server_error_is_retried(
    sms_channel: SmsChannel, twilio_standin: TwilioStandIn
) -> None:
    """A 500 (Twilio 20500) is transient."""
    twilio_standin.script.append(twilio_error(500, 20500, "Internal Server Error"))

    outcome = await sms_channel.send(make_message(), TO)

    assert isinstance(outcome, Retry)
    assert outcome.status_code == 500


async def test_bad_credentials_fail_without_disabling(
    http_client: httpx.AsyncClient,
    clock: ManualClock,
    provider_url: str,
    twilio_standin: TwilioStandIn,
) -> None:
    """A wrong auth token is Twilio 20003: a configuration failure, the number stays."""
    channel = SmsChannel(
        ACCOUNT_SID,
        "wrong-token",
        SMS_FROM,
        client=http_client,
        clock=clock,
        base_url=provider_url,
    )

    outcome = await channel.send(make_message(), TO)

    assert outcome == Failed("twilio 20003: Authenticate", 401)


async def test_unreachable_provider_is_retried(
    http_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Nothing listening at the API is a transient failure, never an exception."""
    channel = SmsChannel(
        ACCOUNT_SID,
        "t",
        SMS_FROM,
        client=http_client,
        clock=clock,
        base_url=f"http://127.0.0.1:{free_port()}",
    )

    outcome = await channel.send(make_message(), TO)

    assert isinstance(outcome, Retry)


async def test_from_settings_requires_credentials(
    http_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """from_settings refuses to build a channel without SID, token and sender."""
    with pytest.raises(ValueError, match="DELIVERY_SMS_ACCOUNT_SID"):
        SmsChannel.from_settings(Settings(), client=http_client, clock=clock)
    settings = Settings(sms_account_sid=ACCOUNT_SID, sms_auth_token="t", sms_from=SMS_FROM)
    assert isinstance(
        SmsChannel.from_settings(settings, client=http_client, clock=clock), SmsChannel
    )


@pytest.mark.parametrize(
    ("status_code", "body", "expected_type", "disable"),
    [
        (400, {"code": 21211, "message": "Invalid 'To' Phone Number"}, Failed, True),
        (400, {"code": 21614, "message": "'To' number is not a valid mobile number"}, Failed, True),
        (
            400,
            {"code": 21610, "message": "Attempt to send to unsubscribed recipient"},
            Failed,
            True,
        ),
        (
            400,
            {"code": 21408, "message": "Permission to send an SMS has not been enabled"},
            Failed,
            False,
        ),
        (400, {"code": 21606, "message": "The 'From' phone number is not valid"}, Failed, False),
        (401, {"code": 20003, "message": "Authenticate"}, Failed, False),
        (429, {"code": 20429, "message": "Too Many Requests"}, Retry, False),
        (400, {"code": 14107, "message": "SMS send rate limit exceeded"}, Retry, False),
        (503, {"code": 20503, "message": "Service Unavailable"}, Retry, False),
        (502, None, Retry, False),
        (404, None, Failed, False),
    ],
    ids=[
        "invalid-to",
        "not-mobile",
        "unsubscribed",
        "region-not-enabled",
        "bad-from",
        "bad-credentials",
        "too-many-requests",
        "send-rate-limit",
        "unavailable",
        "proxy-502",
        "unknown-404",
    ],
)
def test_classify_twilio_error(
    status_code: int, body: Any, expected_type: type, disable: bool
) -> None:
    """Twilio error codes map to transient or permanent, disabling dead numbers."""
    outcome = classify_twilio_error(status_code, body, None)
    assert type(outcome) is expected_type
    assert isinstance(outcome, Retry) or getattr(outcome, "disable_destination", False) is disable


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("", "GSM-7", 1),
        ("Hello!", "GSM-7", 1),
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),
        ("€" * 81, "GSM-7", 2),
        ("a" * 152 + "€" + "a" * 10, "GSM-7", 2),
        ("a" * 152 + "€" + "a" * 152, "GSM-7", 3),
        ("Ça coûte 5€ ou £4 — d'accord?", "UCS-2", 1),
        ("ü" * 70, "GSM-7", 1),
        ("ç" * 70, "UCS-2", 1),
        ("ç" * 71, "UCS-2", 2),
        ("😀" * 35, "UCS-2", 1),
        ("😀" * 36, "UCS-2", 2),
        ("日本語" * 45, "UCS-2", 3),
    ],
    ids=[
        "empty",
        "short",
        "gsm-160-one-segment",
        "gsm-161-two-segments",
        "gsm-306-two-segments",
        "gsm-307-three-segments",
        "gsm-extension-counts-double",
        "gsm-extension-overflow",
        "escape-pair-not-split",
        "escape-pair-pushed-to-next-part",
        "em-dash-forces-ucs2",
        "u-umlaut-is-gsm",
        "c-cedilla-lowercase-is-ucs2",
        "ucs2-71-two-segments",
        "emoji-surrogates-fill-one",
        "emoji-pairs-not-split",
        "cjk",
    ],
)
def test_encoding_and_segments(text: str, encoding: str, segments: int) -> None:
    """Encoding detection and segment counting follow 3GPP TS 23.038 and Twilio's rules."""
    assert sms_encoding(text) == encoding
    assert sms_segments(text) == segments


@pytest.mark.parametrize(
    ("text", "max_segments", "expected"),
    [
        ("short", 10, "short"),
        ("a" * 1530, 10, "a" * 1530),
        ("a" * 1531, 10, "a" * 1527 + "..."),
        ("a" * 200, 1, "a" * 157 + "..."),
        ("word " * 100, 1, ("word " * 31).rstrip() + "..."),
        ("aaaa " * 10 + "b" * 200, 1, "aaaa " * 10 + "b" * 107 + "..."),
        ("ç" * 1000, 1, "ç" * 69 + "…"),
        ("ç" * 1000, 10, "ç" * 669 + "…"),
        ("😀" * 35, 1, "😀" * 35),
        ("😀" * 36, 1, "😀" * 34 + "…"),
    ],
    ids=[
        "fits",
        "exactly-ten-gsm-segments",
        "one-over-is-cut",
        "one-segment",
        "cut-at-word-boundary",
        "long-run-cut-hard",
        "ucs2-one-segment",
        "ucs2-ten-segments",
        "surrogate-pairs-exactly-one-segment",
        "surrogate-pairs-one-over",
    ],
)
def test_fit_sms(text: str, max_segments: int, expected: str) -> None:
    """Text over the segment budget is cut to the longest prefix that fits with an ellipsis."""
    result = fit_sms(text, max_segments)
    assert result == expected
    assert sms_segments(result) <= max_segments
    assert sms_encoding(result) == sms_encoding(text)


def test_fit_sms_rejects_zero_segments() -> None:
    """A budget below one segment is a programming error."""
    with pytest.raises(ValueError, match="max_segments"):
        fit_sms("x", 0)


@given(
    text=st.text(alphabet=st.sampled_from("a €{ç😀\n"), max_size=700),
    max_segments=st.integers(min_value=1, max_value=10),
)
@settings(max_examples=300, deadline=None)
def test_fit_sms_always_fits(text: str, max_segments: int) -> None:
    """Whatever the mix of one- and two-unit characters, the result fits the budget."""
    result = fit_sms(text, max_segments)

    assert sms_segments(result) <= max_segments
    assert result == text or len(result) < len(text) + 3


@settings(max_examples=200, deadline=None)
@given(to=st.text(), sender=st.text(), body=st.text())
def test_sms_form_is_what_urlencode_writes(to: str, sender: str, body: str) -> None:
    """The form written piecewise is byte for byte ``urlencode``'s, whatever the text."""
    for field in ("From", "MessagingServiceSid"):
        expected = urlencode({"To": to, field: sender, "Body": body}).encode()
        assert sms_form(to, urlencode({field: sender}), body) == expected
