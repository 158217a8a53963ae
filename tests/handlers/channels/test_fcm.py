"""FcmChannel against the local FCM and OAuth2 stand-in (requests checked as Google documents)."""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery.clock import ManualClock
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Retry
from handlers.fcm import (
    _JSON,
    MAX_BODY_BYTES,
    REFRESH_MARGIN,
    FcmChannel,
    ServiceAccount,
    build_fcm_payload,
    classify_fcm_error,
    fcm_request_body,
    truncate_utf8,
)
from tests.handlers.channels.conftest import PROJECT_ID, make_message
from tests.handlers.channels.standins import Canned, FcmStandIn, fcm_error, free_port

# Shaped like a real registration token: "<instance id>:APA91b<base64url>".
TOKEN = "dGVzdC1pbnN0YW5jZQ:APA91bHPRgkF3JUikC4ENAHEeMrd41Zxv3hVZjC9KtT8OvPVGJ-hQMRKRrZuJAEc" + (
    "l7B338qju59zJMjw2DELjzEvxwYv7hH5Ynpc1ODQ0aT4U4OFEeco8ohsN5PjL1iC2dNtk2BAokeMCg2ZXKqpc8F"
)


async def test_send_posts_the_documented_message(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """A send is one messages:send with token, notification and a string data map."""
    message = make_message(payload={"title": "From Ada"})
    outcome = await fcm_channel.send(message, TOKEN)

    assert isinstance(outcome, Delivered)
    assert outcome.status_code == 200
    assert outcome.detail.startswith(f"projects/{PROJECT_ID}/messages/")
    assert fcm_standin.exchanges == 1
    assert fcm_standin.sends == [
        {
            "message": {
                "token": TOKEN,
                "notification": {"title": "From Ada", "body": message.generated_message},
                "data": {
                    "event_id": message.event_id,
                    "event_type": "delivery.notification.created",
                    "message_id": message.message_id,
                    "agent_id": "agent-7",
                    "user_id": "user-42",
                    "check_type": "daily_checkin",
                    "created_at": "2026-11-23T08:00:00+00:00",
                },
            }
        }
    ]


async def test_long_body_is_cut_to_fit_the_fcm_payload_limit(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """A message far over FCM's 4096-byte limit is cut with an ellipsis and accepted."""
    outcome = await fcm_channel.send(make_message(generated_message="é" * 5000), TOKEN)

    assert isinstance(outcome, Delivered)
    body = fcm_standin.sends[0]["message"]["notification"]["body"]
    assert body.endswith("…")
    assert len(body.encode()) <= MAX_BODY_BYTES


async def test_access_token_is_cached_until_shortly_before_expiry(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn, clock: ManualClock
) -> None:
    """One exchange serves every send until the refresh margin; then exactly one more."""
    for _ in range(3):
        assert isinstance(await fcm_channel.send(make_message(), TOKEN), Delivered)
    assert fcm_standin.exchanges == 1

    clock.advance(timedelta(hours=1) - REFRESH_MARGIN - timedelta(seconds=1))
    assert isinstance(await fcm_channel.send(make_message(), TOKEN), Delivered)
    assert fcm_standin.exchanges == 1

    clock.advance(timedelta(seconds=1))
    assert isinstance(await fcm_channel.send(make_message(), TOKEN), Delivered)
    assert fcm_standin.exchanges == 2
    assert fcm_standin.unauthenticated == 0


async def test_concurrent_cold_sends_share_one_token_exchange(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """Twenty concurrent first sends trigger a single token exchange."""
    outcomes = await asyncio.gather(*(fcm_channel.send(make_message(), TOKEN) for _ in range(20)))
    assert all(isinstance(o, Delivered) for o in outcomes)
    assert fcm_standin.exchanges == 1


async def test_401_refreshes_the_token_once_and_resends(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """A revoked access token is dropped, a new one fetched, and the send succeeds."""
    assert isinstance(await fcm_channel.send(make_message(), TOKEN), Delivered)
    fcm_standin.revoke_all()

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert isinstance(outcome, Delivered)
    assert fcm_standin.unauthenticated == 1
    assert fcm_standin.exchanges == 2


async def test_401_after_refresh_fails_without_looping(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """A 401 that survives one refresh is a permanent failure; the token is not disabled."""
    unauthenticated = fcm_error(
        401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
    )
    fcm_standin.script.extend([unauthenticated, unauthenticated])

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert outcome == Failed(
        "fcm UNAUTHENTICATED: Request had invalid authentication credentials.", 401
    )
    assert fcm_standin.exchanges == 2
    assert fcm_standin.send_count == 2


async def test_third_party_auth_error_does_not_refresh_our_token(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """A 401 THIRD_PARTY_AUTH_ERROR (APNs credentials) fails at once; our token is kept."""
    fcm_standin.script.append(
        fcm_error(401, "UNAUTHENTICATED", "Auth error from APNS", "THIRD_PARTY_AUTH_ERROR")
    )

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert outcome == Failed("fcm THIRD_PARTY_AUTH_ERROR: Auth error from APNS", 401)
    assert fcm_standin.exchanges == 1
    assert fcm_standin.send_count == 1


async def test_unregistered_token_is_disabled(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """UNREGISTERED (404) marks the device token dead."""
    fcm_standin.dead_tokens.add(TOKEN)

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert isinstance(outcome, Failed)
    assert outcome.disable_destination is True
    assert outcome.status_code == 404
    assert "UNREGISTERED" in outcome.reason


async def test_invalid_registration_token_is_disabled(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """INVALID_ARGUMENT about the registration token disables it."""
    fcm_standin.script.append(
        fcm_error(
            400,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            "INVALID_ARGUMENT",
        )
    )

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert isinstance(outcome, Failed)
    assert outcome.disable_destination is True


async def test_quota_exceeded_is_retried_after_retry_after(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """429 QUOTA_EXCEEDED is a Retry carrying the server's Retry-After."""
    error = fcm_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", "QUOTA_EXCEEDED")
    fcm_standin.script.append(Canned(429, error.body, {"Retry-After": "37"}))

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert outcome == Retry("fcm QUOTA_EXCEEDED: Quota exceeded.", 429, timedelta(seconds=37))


async def test_unavailable_is_retried(fcm_channel: FcmChannel, fcm_standin: FcmStandIn) -> None:
    """503 UNAVAILABLE is a Retry without a hint when the server sends none."""
    fcm_standin.script.append(
        fcm_error(503, "UNAVAILABLE", "The service is currently unavailable.", "UNAVAILABLE")
    )

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert isinstance(outcome, Retry)
    assert outcome.status_code == 503
    assert outcome.after is None


async def test_token_endpoint_rejection_fails_without_sending(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """invalid_grant at the token endpoint is a Failed and no message is sent."""
    fcm_standin.token_script.append(
        Canned(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
    )

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert outcome == Failed(
        "fcm token exchange failed: 400 invalid_grant: Invalid JWT Signature.", 400
    )
    assert fcm_standin.send_count == 0


async def test_assertion_signed_with_another_key_is_rejected(
    service_account_info: dict[str, str],
    http_client: httpx.AsyncClient,
    clock: ManualClock,
    provider_url: str,
    fcm_standin: FcmStandIn,
) -> None:
    """The stand-in really verifies the RS256 signature: a foreign key gets invalid_grant."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    channel = FcmChannel(
        ServiceAccount.from_json({**service_account_info, "private_key": pem}),
        client=http_client,
        clock=clock,
        base_url=provider_url,
        token_url=f"{provider_url}/token",
    )

    outcome = await channel.send(make_message(), TOKEN)

    assert isinstance(outcome, Failed)
    assert outcome.status_code == 400
    assert "invalid_grant" in outcome.reason
    assert fcm_standin.send_count == 0
    assert [p.split(":")[1].strip() for p in fcm_standin.problems] == ["assertion rejected"]
    fcm_standin.problems.clear()  # expected here; the fixture asserts none remain


async def test_token_endpoint_outage_is_retried(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn
) -> None:
    """A 503 from the token endpoint is a Retry with its Retry-After."""
    fcm_standin.token_script.append(Canned(503, {"error": "backend_error"}, {"Retry-After": "5"}))

    outcome = await fcm_channel.send(make_message(), TOKEN)

    assert isinstance(outcome, Retry)
    assert outcome.after == timedelta(seconds=5)


async def test_unreachable_fcm_is_retried(
    service_account_info: dict[str, str], http_client: httpx.AsyncClient, clock: ManualClock
) -> None:
    """Nothing listening at the API is a transient failure, never an exception."""
    dead = f"http://127.0.0.1:{free_port()}"
    channel = FcmChannel(
        ServiceAccount.from_json(service_account_info),
        client=http_client,
        clock=clock,
        base_url=dead,
        token_url=f"{dead}/token",
    )

    outcome = await channel.send(make_message(), TOKEN)

    assert isinstance(outcome, Retry)
    assert "unreachable" in outcome.reason


async def test_from_settings_reads_the_key_file(
    tmp_path: Path,
    service_account_info: dict[str, str],
    clock: ManualClock,
    http_client: httpx.AsyncClient,
) -> None:
    """from_settings loads the service-account file named in settings, or says what is unset."""
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(service_account_info))
    settings = Settings(fcm_service_account_file=path, fcm_base_url="http://fcm.invalid")

    assert isinstance(
        FcmChannel.from_settings(settings, client=http_client, clock=clock), FcmChannel
    )
    with pytest.raises(ValueError, match="SERVICE_ACCOUNT_FILE"):
        FcmChannel.from_settings(Settings(), client=http_client, clock=clock)


def test_service_account_rejects_an_unusable_key(service_account_info: dict[str, str]) -> None:
    """A private_key that is not a PEM RSA key is refused at start-up."""
    with pytest.raises(ValueError, match="private_key is unusable"):
        ServiceAccount.from_json({**service_account_info, "private_key": "not a key"})


async def test_short_lived_token_is_reused_for_half_its_life(
    fcm_channel: FcmChannel, fcm_standin: FcmStandIn, clock: ManualClock
) -> None:
    """A token shorter-lived than the refresh margin is still cached, for half its life."""
    fcm_standin.expires_in = 120

    assert isinstance(await fcm_channel.send(make_message(), TOKEN), Delivered)
    clock.advance(timedelta(seconds=59))
    assert isinstance(await fcm_channel.send(make_message(), TOKEN), Delivered)
    assert fcm_standin.exchanges == 1
    clock.advance(timedelta(seconds=1))
    assert isinstance(await fcm_channel.send(make_message(), TOKEN), Delivered)
    assert fcm_standin.exchanges == 2


@pytest.mark.parametrize(
    "missing", ["project_id", "client_email", "private_key"], ids=lambda m: f"no-{m}"
)
def test_service_account_requires_fields(
    service_account_info: dict[str, str], missing: str
) -> None:
    """A key file without a required field is refused at start-up, naming the field."""
    info = {k: v for k, v in service_account_info.items() if k != missing}
    with pytest.raises(ValueError, match=missing):
        ServiceAccount.from_json(info)


def _fcm_body(status: str, message: str, code: str = "", extra: list[Any] | None = None) -> Any:
    details: list[Any] = (
        [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]
        if code
        else []
    )
    return {
        "error": {
            "code": 0,
            "message": message,
            "status": status,
            "details": details + (extra or []),
        }
    }


@pytest.mark.parametrize(
    ("status_code", "body", "expected_type", "disable"),
    [
        (
            404,
            _fcm_body("NOT_FOUND", "Requested entity was not found.", "UNREGISTERED"),
            Failed,
            True,
        ),
        (
            403,
            _fcm_body("PERMISSION_DENIED", "SenderId mismatch", "SENDER_ID_MISMATCH"),
            Failed,
            True,
        ),
        (
            400,
            _fcm_body(
                "INVALID_ARGUMENT",
                "Invalid value at 'message.token'",
                "INVALID_ARGUMENT",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": "message.token", "description": "bad"}],
                    }
                ],
            ),
            Failed,
            True,
        ),
        (
            400,
            _fcm_body(
                "INVALID_ARGUMENT", "Invalid value at 'message.data[0].value'", "INVALID_ARGUMENT"
            ),
            Failed,
            False,
        ),
        (
            401,
            _fcm_body("UNAUTHENTICATED", "APNs auth failed", "THIRD_PARTY_AUTH_ERROR"),
            Failed,
            False,
        ),
        (403, _fcm_body("PERMISSION_DENIED", "Permission denied"), Failed, False),
        (429, _fcm_body("RESOURCE_EXHAUSTED", "Quota", "QUOTA_EXCEEDED"), Retry, False),
        (500, _fcm_body("INTERNAL", "Internal error", "INTERNAL"), Retry, False),
        (503, _fcm_body("UNAVAILABLE", "Unavailable", "UNAVAILABLE"), Retry, False),
        (502, "<html>Bad Gateway</html>", Retry, False),
        (418, None, Failed, False),
    ],
    ids=[
        "unregistered",
        "sender-id-mismatch",
        "invalid-token-field-violation",
        "invalid-payload-keeps-token",
        "third-party-auth",
        "permission-denied",
        "quota",
        "internal",
        "unavailable",
        "proxy-502-html",
        "unknown-4xx",
    ],
)
def test_classify_fcm_error(
    status_code: int, body: Any, expected_type: type, disable: bool
) -> None:
    """Each documented FCM error code maps to the right outcome."""
    outcome = classify_fcm_error(status_code, body, None)
    assert type(outcome) is expected_type
    assert isinstance(outcome, Retry) or getattr(outcome, "disable_destination", False) is disable


def test_truncate_utf8_never_splits_a_character() -> None:
    """Cutting by bytes keeps valid UTF-8 and marks the cut."""
    assert truncate_utf8("short", 10) == "short"
    cut = truncate_utf8("😀" * 10, 17)
    assert cut == "😀" * 3 + "…"
    assert len(cut.encode()) <= 17


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(),
    title=st.one_of(st.none(), st.text(), st.integers()),
    ids=st.lists(st.text(max_size=12), min_size=5, max_size=5),
    token=st.text(max_size=40),
    micros=st.integers(min_value=0, max_value=999_999),
)
def test_request_body_is_the_payloads_json(
    text: str, title: object, ids: list[str], token: str, micros: int
) -> None:
    """The body written directly is byte for byte the JSON of ``build_fcm_payload``."""
    message = make_message(
        generated_message=text + '"\\\n\u2028\u00e9\U0001f600' * (len(text) % 3),
        payload={} if title is None else {"title": title},
        event_id=ids[0],
        event_type=ids[1],
        message_id=ids[2],
        agent_id=ids[3],
        check_type=ids[4],
        created_at=datetime(2026, 11, 23, 8, 0, 0, micros, tzinfo=UTC),
    )

    expected = _JSON.encode(build_fcm_payload(message, token, default_title="Hi")).encode()

    assert fcm_request_body(message, token, default_title="Hi") == expected
