"""Webhook signing and verification: fixed vectors, the documented verifier, standardwebhooks."""

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from delivery.clock import SystemClock
from handlers.webhooks.signing import (
    MalformedSignatureError,
    MissingSignatureError,
    Scheme,
    SignatureMismatchError,
    SigningKey,
    TimestampOutOfToleranceError,
    active_secrets,
    generate_secret,
    sign,
    verify,
    verify_sonzai,
    verify_standard,
)

# The Standard Webhooks / Svix published test vector (svix python/tests/test_webhooks.py).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OLD = "whsec_" + base64.b64encode(b"o" * 24).decode()
NEW = "whsec_" + base64.b64encode(b"n" * 24).decode()
T0 = datetime.fromtimestamp(SPEC_TS, UTC)
BODY = '{"event_id":"evt_1","generated_message":"Hi ✨ there"}'.encode()


def seed_verify(raw_body: str, signature_header: str, secret: str) -> bool:
    """A line-by-line port of the documented TypeScript `verifyWebhookSignature` sample."""
    key = secret[6:] if secret.startswith("whsec_") else secret
    parts = dict(p.split("=") for p in signature_header.split(","))  # Object.fromEntries
    timestamp, received = parts.get("t"), parts.get("v1")
    if not timestamp or not received:
        return False
    expected = hmac.new(
        key.encode(), f"{timestamp}.{raw_body}".encode(), hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(received.encode(), expected.encode())


def test_standard_signature_matches_published_vector() -> None:
    """Our webhook-signature equals the Standard Webhooks spec's published example."""
    headers = sign(SPEC_BODY, msg_id=SPEC_ID, secrets=[SPEC_SECRET], now=T0)
    assert headers["webhook-signature"] == SPEC_SIGNATURE
    assert headers["webhook-id"] == SPEC_ID
    assert headers["webhook-timestamp"] == str(SPEC_TS)


def test_standard_signature_matches_hand_computed_hmac() -> None:
    """webhook-signature is base64 HMAC-SHA256 of id.ts.body keyed by the decoded secret."""
    key = base64.b64decode(NEW.removeprefix("whsec_"))
    mac = hmac.new(key, b"evt_1." + str(SPEC_TS).encode() + b"." + BODY, hashlib.sha256)
    expected = "v1," + base64.b64encode(mac.digest()).decode()
    assert sign(BODY, msg_id="evt_1", secrets=[NEW], now=T0)["webhook-signature"] == expected


def test_sonzai_signature_matches_hand_computed_hmac() -> None:
    """Sonzai-Signature is t=<unix>,v1=<hex HMAC of "t.body"> keyed by the text after whsec_."""
    key = NEW.removeprefix("whsec_").encode()
    digest = hmac.new(key, f"{SPEC_TS}.".encode() + BODY, hashlib.sha256).hexdigest()
    header = sign(BODY, msg_id="evt_1", secrets=[NEW], now=T0)["Sonzai-Signature"]
    assert header == f"t={SPEC_TS},v1={digest}"


@pytest.mark.parametrize("length", [3, 48, 63, 64, 66, 192])
def test_signatures_match_hmac_for_keys_of_every_length(length: int) -> None:
    """
    Both headers equal ``hmac``'s own HMAC-SHA256 whatever the key's length: shorter
    than SHA-256's 64-byte block (padded), exactly one, and longer (hashed first), for
    the decoded bytes (Standard Webhooks) and the text (Sonzai, 4 to 256 characters).
    """
    secret = "whsec_" + base64.b64encode(bytes(range(length))).decode().rstrip("=")
    text_key = secret.removeprefix("whsec_").encode()
    headers = sign(BODY, msg_id="evt_1", secrets=(secret,), now=T0)
    sonzai = hmac.new(text_key, f"{SPEC_TS}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert headers["Sonzai-Signature"] == f"t={SPEC_TS},v1={sonzai}"
    standard = hmac.new(bytes(range(length)), f"evt_1.{SPEC_TS}.".encode() + BODY, "sha256")
    assert headers["webhook-signature"] == "v1," + base64.b64encode(standard.digest()).decode()


def test_seed_sample_verifier_accepts_our_header() -> None:
    """The documented verification sample accepts what we send."""
    header = sign(BODY, msg_id="evt_1", secrets=[NEW], now=T0)["Sonzai-Signature"]
    assert seed_verify(BODY.decode(), header, NEW)


def test_seed_sample_verifier_sees_current_secret_during_rotation() -> None:
    """With two secrets the documented last-v1-wins parser still verifies with the current one."""
    header = sign(BODY, msg_id="evt_1", secrets=[NEW, OLD], now=T0)["Sonzai-Signature"]
    assert header.count("v1=") == 2
    assert seed_verify(BODY.decode(), header, NEW)


@pytest.mark.parametrize(
    ("attempt", "verifies"),
    [(1, NEW), (2, OLD), (3, NEW), (4, OLD)],
    ids=["first", "first-retry", "second-retry", "third-retry"],
)
def test_seed_sample_verifier_alternates_secrets_across_retries(
    attempt: int, verifies: str
) -> None:
    """
    During the overlap the last v1 (the one the documented sample keeps) is the new
    secret's on odd attempts and the old one's on retries, so a receiver holding either
    verifies within two attempts; the header always carries both.
    """
    signing = active_secrets(NEW, OLD, T0, now=T0 + timedelta(hours=1), attempt_number=attempt)
    header = sign(BODY, msg_id="evt_1", secrets=signing, now=T0)["Sonzai-Signature"]
    assert header.count("v1=") == 2
    other = OLD if verifies == NEW else NEW
    assert seed_verify(BODY.decode(), header, verifies)
    assert not seed_verify(BODY.decode(), header, other)
    verify_sonzai(BODY, header, [other], now=T0)  # a verifier reading every v1 takes both


def test_after_the_overlap_every_attempt_carries_only_the_new_secret() -> None:
    """Past 24 h the old secret signs nothing, whatever the attempt."""
    for attempt in (1, 2):
        signing = active_secrets(NEW, OLD, T0, now=T0 + timedelta(hours=24), attempt_number=attempt)
        assert signing == (NEW,)


def test_standardwebhooks_library_verifies_what_we_send() -> None:
    """The reference library (which reads the real clock) verifies our headers and body."""
    headers = sign(BODY, msg_id="evt_1", secrets=[NEW], now=SystemClock().now())
    assert Webhook(NEW).verify(BODY, headers) == {
        "event_id": "evt_1",
        "generated_message": "Hi ✨ there",
    }


@pytest.mark.parametrize("receiver_secret", [NEW, OLD], ids=["current", "previous"])
def test_standardwebhooks_library_verifies_each_rotation_secret(receiver_secret: str) -> None:
    """During a rotation a library receiver holding either secret verifies us."""
    headers = sign(BODY, msg_id="evt_1", secrets=[NEW, OLD], now=SystemClock().now())
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(receiver_secret).verify(BODY, headers)


def test_standardwebhooks_library_rejects_secret_rotated_out() -> None:
    """Once the previous secret stops signing, a library receiver holding it fails."""
    headers = sign(BODY, msg_id="evt_1", secrets=[NEW], now=SystemClock().now())
    with pytest.raises(WebhookVerificationError):
        Webhook(OLD).verify(BODY, headers)


def test_we_verify_what_the_library_signs() -> None:
    """Headers produced by standardwebhooks' own sign() pass our verifier."""
    signature = Webhook(SPEC_SECRET).sign(SPEC_ID, T0, SPEC_BODY.decode())
    headers = {
        "Webhook-Id": SPEC_ID,
        "Webhook-Timestamp": str(SPEC_TS),
        "Webhook-Signature": signature,
    }
    result = verify(SPEC_BODY, headers, [SPEC_SECRET], now=T0 + timedelta(seconds=30))
    assert result.scheme is Scheme.STANDARD
    assert result.msg_id == SPEC_ID


def _headers(scheme: Scheme, secrets: list[str], body: bytes = BODY) -> dict[str, str]:
    signed = sign(body, msg_id="evt_1", secrets=secrets, now=T0)
    if scheme is Scheme.SONZAI:
        return {"Sonzai-Signature": signed["Sonzai-Signature"]}
    return {k: v for k, v in signed.items() if k.startswith("webhook-")}


SCHEMES = pytest.mark.parametrize("scheme", list(Scheme), ids=[s.value for s in Scheme])


@SCHEMES
def test_valid_signature_verifies(scheme: Scheme) -> None:
    """A fresh signature over the untouched body verifies, and names its scheme."""
    result = verify(BODY, _headers(scheme, [NEW]), [NEW], now=T0 + timedelta(seconds=299))
    assert result.scheme is scheme
    assert result.signed_at == T0


@SCHEMES
def test_tampered_body_fails(scheme: Scheme) -> None:
    """One changed byte in the body fails verification."""
    with pytest.raises(SignatureMismatchError):
        verify(BODY.replace(b"Hi", b"Ho"), _headers(scheme, [NEW]), [NEW], now=T0)


@SCHEMES
def test_stale_timestamp_fails(scheme: Scheme) -> None:
    """A signature older than five minutes fails even though the HMAC is right."""
    with pytest.raises(TimestampOutOfToleranceError):
        verify(BODY, _headers(scheme, [NEW]), [NEW], now=T0 + timedelta(seconds=301))


@SCHEMES
def test_future_timestamp_fails(scheme: Scheme) -> None:
    """A timestamp more than five minutes ahead fails too (clock skew bound both ways)."""
    with pytest.raises(TimestampOutOfToleranceError):
        verify(BODY, _headers(scheme, [NEW]), [NEW], now=T0 - timedelta(seconds=301))


@SCHEMES
def test_wrong_secret_fails(scheme: Scheme) -> None:
    """A receiver holding an unrelated secret rejects the delivery."""
    other = generate_secret()
    with pytest.raises(SignatureMismatchError):
        verify(BODY, _headers(scheme, [NEW]), [other], now=T0)


@SCHEMES
def test_rotated_out_secret_fails(scheme: Scheme) -> None:
    """After the overlap only the new secret signs, so a receiver still on the old one fails."""
    signing = active_secrets(NEW, OLD, T0, now=T0 + timedelta(hours=24))
    with pytest.raises(SignatureMismatchError):
        verify(BODY, _headers(scheme, list(signing)), [OLD], now=T0)


@SCHEMES
def test_receiver_with_both_secrets_accepts_either(scheme: Scheme) -> None:
    """A receiver configured with old and new secrets accepts a delivery signed by the new one."""
    verify(BODY, _headers(scheme, [NEW]), [OLD, NEW], now=T0)


def test_no_signature_headers_is_missing() -> None:
    """A request without either scheme's headers is MISSING_SIGNATURE."""
    with pytest.raises(MissingSignatureError):
        verify(BODY, {"content-type": "application/json"}, [NEW], now=T0)


@pytest.mark.parametrize(
    "header",
    ["v1=abc", "t=1614265330", "t=soon,v1=00", "garbage"],
    ids=["no-t", "no-v1", "non-numeric-t", "garbage"],
)
def test_malformed_sonzai_header(header: str) -> None:
    """A Sonzai-Signature without t= and a hex v1= is malformed, not a mismatch."""
    with pytest.raises(MalformedSignatureError):
        verify_sonzai(BODY, header, [NEW], now=T0)


def test_standard_headers_missing_id_is_malformed() -> None:
    """Standard headers without webhook-id are malformed."""
    headers = _headers(Scheme.STANDARD, [NEW])
    del headers["webhook-id"]
    with pytest.raises(MalformedSignatureError):
        verify_standard(BODY, headers, [NEW], now=T0)


def test_standard_failure_falls_back_to_sonzai() -> None:
    """When both schemes are sent and only Sonzai-Signature verifies, the request passes."""
    headers = sign(BODY, msg_id="evt_1", secrets=[NEW], now=T0)
    headers["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
    assert verify(BODY, headers, [NEW], now=T0).scheme is Scheme.SONZAI


def test_generated_secret_shape() -> None:
    """A generated secret is whsec_ + base64 of 24 random bytes, accepted by the library."""
    secret = generate_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 24
    Webhook(secret)  # the reference library accepts it
    assert generate_secret() != secret


def test_generate_secret_uses_injected_randomness() -> None:
    """The randomness source is injectable, so the output is reproducible in tests."""
    assert generate_secret(lambda n: bytes(n)) == "whsec_" + "A" * 32


@pytest.mark.parametrize(
    ("since_rotation", "expected"),
    [(timedelta(hours=23, minutes=59), (NEW, OLD)), (timedelta(hours=24), (NEW,))],
    ids=["inside-24h", "after-24h"],
)
def test_active_secrets_overlap(since_rotation: timedelta, expected: tuple[str, ...]) -> None:
    """The previous secret signs for exactly 24 hours after a rotation."""
    assert active_secrets(NEW, OLD, T0, now=T0 + since_rotation) == expected


@pytest.mark.parametrize(
    "secret", ["", "whsec_", "whsec_not base64!"], ids=["empty", "prefix-only", "bad"]
)
def test_unusable_secret_is_refused(secret: str) -> None:
    """A secret that is empty or not base64 raises ValueError instead of signing."""
    with pytest.raises(ValueError, match="secret"):
        SigningKey.parse(secret)


@given(key=st.binary(min_size=1, max_size=64), padded=st.booleans())
def test_a_secret_padded_or_not_signs_as_the_reference_library_reads_it(
    key: bytes, padded: bool
) -> None:
    """
    A ``whsec_`` secret of any length, its base64 padded or not, is the key the
    Standard Webhooks library reads from it: that library verifies what we sign.
    """
    body = base64.b64encode(key).decode()
    secret = "whsec_" + (body if padded else body.rstrip("="))
    assert SigningKey.parse(secret).standard_key == key
    headers = sign(BODY, msg_id="evt_1", secrets=[secret], now=SystemClock().now())
    Webhook(secret).verify(BODY, headers)


def test_signing_key_repr_hides_secret() -> None:
    """Key material never appears in a repr (and so never in a log line)."""
    assert NEW.removeprefix("whsec_") not in repr(SigningKey.parse(NEW))


@given(
    body=st.binary(max_size=512),
    msg_id=st.text(
        alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40
    ),
    skew=st.integers(min_value=-300, max_value=300),
)
def test_sign_then_verify_roundtrips(body: bytes, msg_id: str, skew: int) -> None:
    """Any body and id we sign verifies under both schemes within the tolerance."""
    signed = sign(body, msg_id=msg_id, secrets=[NEW, OLD], now=T0)
    now = T0 + timedelta(seconds=skew)
    assert verify_standard(body, signed, [OLD], now=now) == (msg_id, T0)
    assert verify_sonzai(body, signed["Sonzai-Signature"], [NEW], now=now) == T0
