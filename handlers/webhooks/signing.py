"""
PURE webhook signing and verification for both schemes we send: ``Sonzai-Signature``
(the Sonzai "Webhooks" docs) and Standard Webhooks (``spec/standard-webhooks.md``).

``now`` is always passed in: nothing here reads a clock or does I/O, except
:func:`generate_secret`, whose randomness source is injectable.
"""

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import ClassVar

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
"""Every signing secret starts with this (the Sonzai docs: "Prefix whsec_")."""

SECRET_BYTES = 24
"""Random bytes in a generated secret: 192 bits, as Svix issues; base64 without padding."""

TOLERANCE = timedelta(minutes=5)
"""Seeds/001 "Timestamp tolerance" and the Standard Webhooks spec both use 5 minutes."""

ROTATION_OVERLAP = timedelta(hours=24)
"""After a rotation the previous secret keeps signing this long, so receivers roll."""

SONZAI_SIGNATURE = "sonzai-signature"
WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"

# A header with hundreds of candidate signatures is an attack on our CPU, not a rotation.
_MAX_CANDIDATES = 16


class Scheme(StrEnum):
    """Which signature scheme authenticated a request."""

    STANDARD = "standard"
    SONZAI = "sonzai"


class SignatureError(Exception):
    """
    A request that cannot be authenticated. ``code`` is the stable wire code the receiver
    answers with; ``status`` its HTTP status (400 malformed, 401 not authentic).
    """

    code: ClassVar[str] = "INVALID_SIGNATURE"
    status: ClassVar[int] = 401


class MissingSignatureError(SignatureError):
    """Neither ``Sonzai-Signature`` nor the Standard Webhooks headers are present."""

    code = "MISSING_SIGNATURE"
    status = 401


class MalformedSignatureError(SignatureError):
    """A signature header is present but does not follow its scheme's syntax."""

    code = "MALFORMED_SIGNATURE"
    status = 400


class TimestampOutOfToleranceError(SignatureError):
    """The signed timestamp is more than the tolerance away from now (replay guard)."""

    code = "TIMESTAMP_OUT_OF_TOLERANCE"
    status = 401


class SignatureMismatchError(SignatureError):
    """No signature in the header matches any of the configured secrets."""

    code = "INVALID_SIGNATURE"
    status = 401


@dataclass(frozen=True, slots=True)
class SigningKey:
    """
    One ``whsec_`` secret, pre-decoded for both schemes.

    The two schemes key their HMAC differently, and both ways are fixed by their
    specifications:

    - ``Sonzai-Signature`` keys with the secret text *minus* ``whsec_``, as UTF-8
      (the Sonzai sample: ``createHmac("sha256", secret.slice(6))``).
    - Standard Webhooks keys with the base64-*decoded* bytes after ``whsec_``
      (``standardwebhooks.Webhook.__init__``).
    """

    secret: str = field(repr=False)
    sonzai_key: bytes = field(repr=False)
    standard_key: bytes = field(repr=False)

    @classmethod
    def parse(cls, secret: str) -> "SigningKey":
        """
        Decode ``secret`` (``whsec_<base64>``; the prefix is optional, as in the Sonzai docs).

        Raises:
            ValueError: the secret is empty or its body is not base64.
        """
        return _parse(secret)


@lru_cache(maxsize=4096)
def _parse(secret: str) -> SigningKey:
    body = secret.removeprefix(SECRET_PREFIX)
    if not body:
        raise ValueError("webhook signing secret is empty")
    # Standard Webhooks accepts the body padded or not (its library appends "==" and
    # decodes leniently); a strict decode needs exactly the padding the length asks
    # for, so it is cut off and put back.
    unpadded = body.rstrip("=")
    try:
        raw = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("webhook signing secret is not whsec_ followed by base64") from exc
    if not raw:
        raise ValueError("webhook signing secret is empty")
    return SigningKey(secret=secret, sonzai_key=body.encode(), standard_key=raw)


type SecretLike = str | SigningKey


@lru_cache(maxsize=1024)
def _parsed(secret: str) -> SigningKey:
    # One endpoint signs every delivery with the same secret: decode it once.
    return SigningKey.parse(secret)


def _keys(secrets: Iterable[SecretLike]) -> tuple[SigningKey, ...]:
    if type(secrets) is tuple:
        # The sender passes the same tuple of an endpoint's secrets on every delivery.
        return _keys_of(secrets)
    return _parse_all(secrets)


@lru_cache(maxsize=1024)
def _keys_of(secrets: tuple[SecretLike, ...]) -> tuple[SigningKey, ...]:
    return _parse_all(secrets)


def _parse_all(secrets: Iterable[SecretLike]) -> tuple[SigningKey, ...]:
    keys = tuple(s if isinstance(s, SigningKey) else _parsed(s) for s in secrets)
    if not keys:
        raise ValueError("at least one signing secret is required")
    return keys


def generate_secret(random_bytes: Callable[[int], bytes] = _secrets.token_bytes) -> str:
    """
    A fresh signing secret: ``whsec_`` + standard base64 of :data:`SECRET_BYTES` bytes.

    24 bytes encode to 32 base64 characters without padding, which both the Sonzai
    verifier (HMAC key = the text) and ``standardwebhooks.Webhook`` (base64) accept.
    """
    return SECRET_PREFIX + base64.b64encode(random_bytes(SECRET_BYTES)).decode("ascii")


def active_secrets(
    current: str,
    previous: str | None,
    rotated_at: datetime | None,
    *,
    now: datetime,
    overlap: timedelta = ROTATION_OVERLAP,
    attempt_number: int = 1,
) -> tuple[str, ...]:
    """
    The secrets that sign attempt ``attempt_number`` of a delivery made at ``now``:
    the current one, and the previous one too while ``now`` is less than ``overlap``
    after ``rotated_at``.

    Order matters to receivers that keep one ``v1`` of ``Sonzai-Signature`` (the
    documented sample verifier keeps the last; see :func:`sonzai_signature`, which
    writes the first secret's signature last). During the overlap, odd attempts put
    the current secret first, so a receiver already holding the new secret verifies
    every first attempt; even attempts (retries) put the previous one first, so a
    receiver still holding the old secret, which refuses the first attempt, verifies
    the retry (the first comes 5 s later). Receivers that check every ``v1`` (ours,
    and Standard Webhooks' ``webhook-signature``) verify either order.
    """
    if previous and rotated_at is not None and now - rotated_at < overlap:
        return (previous, current) if attempt_number % 2 == 0 else (current, previous)
    return (current,)


def _unix(now: datetime) -> int:
    if now.tzinfo is None:
        raise ValueError("signing needs an aware datetime")
    # Floor, like standardwebhooks' sign(); int() truncates towards zero, equal after 1970.
    return int(now.timestamp())


def _hmac(key: bytes, *parts: bytes) -> bytes:
    inner_pad, outer_pad = _keyed(key)
    inner = inner_pad.copy()
    for part in parts:
        inner.update(part)
    outer = outer_pad.copy()
    outer.update(inner.digest())
    return outer.digest()


_BLOCK = 64
"""SHA-256's block size: HMAC pads (or first hashes) its key to this many bytes."""
_INNER = bytes(x ^ 0x36 for x in range(256))
_OUTER = bytes(x ^ 0x5C for x in range(256))


@lru_cache(maxsize=4096)
def _keyed(key: bytes) -> tuple["hashlib._Hash", "hashlib._Hash"]:
    """
    HMAC-SHA256 keyed with ``key`` (RFC 2104), as its two SHA-256 states after the
    padded key, never updated: :func:`_hmac` copies them. One endpoint signs every
    delivery with the same keys, so the key's set-up (hashing the padded key twice)
    is done once per key; signing was about a tenth of the webhook worker's CPU under
    py-spy in ``bench/bench_webhooks_e2e.py``.

    Written out rather than copying an ``hmac.HMAC``: ``hmac``'s own pure-Python
    construction, but its Python wrapper around the OpenSSL object (``copy``,
    ``update``, ``digest`` each a Python call) made one MAC over a 500-byte body
    3.2 us against 1.8 us for the two ``hashlib`` copies here (timeit, 3.12). The
    signature tests pin the result against ``hmac`` itself.
    """
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return hashlib.sha256(key.translate(_INNER)), hashlib.sha256(key.translate(_OUTER))


def sonzai_signature(body: bytes, *, timestamp: int, secrets: Iterable[SecretLike]) -> str:
    """
    The ``Sonzai-Signature`` value: ``t=<unix>,v1=<hex HMAC-SHA256("<t>.<raw body>")>``.

    With several secrets (a rotation in progress) the header repeats ``v1=`` once per
    secret, comma-separated, as Stripe's ``t=..,v1=..`` format (which this one mirrors)
    does while a secret rolls. The *first* secret's signature is written *last*:
    the Sonzai sample verifier parses with ``Object.fromEntries``, which keeps the last
    ``v1``, so a receiver that knows one secret and uses that sample sees the current
    secret's signature, exactly as without rotation.
    """
    return _sonzai_value(body, timestamp, _keys(secrets))


def _sonzai_value(body: bytes, timestamp: int, keys: tuple[SigningKey, ...]) -> str:
    prefix = b"%d." % timestamp
    sigs = ["v1=" + _hmac(k.sonzai_key, prefix, body).hex() for k in keys]
    sigs.reverse()
    return ",".join([f"t={timestamp}", *sigs])


def standard_signature(
    body: bytes, *, msg_id: str, timestamp: int, secrets: Iterable[SecretLike]
) -> str:
    """
    The Standard Webhooks ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>`` over
    ``<msg_id>.<timestamp>.<body>``, one per secret, space-separated (spec: "multiple
    space-delimited signatures" for rotation).
    """
    return _standard_value(body, msg_id, timestamp, _keys(secrets))


def _standard_value(body: bytes, msg_id: str, timestamp: int, keys: tuple[SigningKey, ...]) -> str:
    prefix = f"{msg_id}.{timestamp}.".encode()
    return " ".join(
        [
            "v1," + base64.b64encode(_hmac(k.standard_key, prefix, body)).decode("ascii")
            for k in keys
        ]
    )


def sign(
    body: bytes, *, msg_id: str, secrets: Iterable[SecretLike], now: datetime
) -> dict[str, str]:
    """
    Every signature header of one delivery, computed over the exact ``body`` bytes sent.

    Args:
        body: the raw request body.
        msg_id: the event id; sent as ``webhook-id`` and stable across retries so
            receivers dedupe on it.
        secrets: active secrets, current first (see :func:`active_secrets`).
        now: the signing instant (aware); both schemes carry it in whole seconds.

    Returns:
        ``Sonzai-Signature``, ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``.

    Raises:
        ValueError: no secret, an undecodable secret, or a naive ``now``.
    """
    # The secrets are parsed once for both schemes (each public function parses its own).
    keys = _keys(secrets)
    ts = _unix(now)
    return {
        "Sonzai-Signature": _sonzai_value(body, ts, keys),
        WEBHOOK_ID: msg_id,
        WEBHOOK_TIMESTAMP: str(ts),
        WEBHOOK_SIGNATURE: _standard_value(body, msg_id, ts, keys),
    }


def _parse_timestamp(raw: str) -> int:
    # Both schemes send integer seconds; anything else is malformed, not merely stale.
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise MalformedSignatureError(f"signature timestamp {raw[:20]!r} is not unix seconds")
    return int(raw)


def _check_tolerance(ts: int, now: datetime, tolerance: timedelta) -> datetime:
    signed_at = datetime.fromtimestamp(ts, UTC)
    if abs(now - signed_at) > tolerance:
        raise TimestampOutOfToleranceError(
            f"signature timestamp {signed_at.isoformat()} is more than "
            f"{int(tolerance.total_seconds())} s from now"
        )
    return signed_at


def _matches(expected: Iterable[bytes], candidates: Iterable[bytes]) -> bool:
    found = False
    for cand in candidates:
        for exp in expected:
            # Constant time per comparison (the Sonzai sample uses timingSafeEqual); we keep
            # looping after a hit so the work done does not depend on which one matched.
            found |= hmac.compare_digest(exp, cand)
    return found


def verify_sonzai(
    body: bytes,
    header: str,
    secrets: Iterable[SecretLike],
    *,
    now: datetime,
    tolerance: timedelta = TOLERANCE,
) -> datetime:
    """
    Verify a ``Sonzai-Signature`` header on the raw ``body``.

    Accepts any ``v1=`` entry matching any secret (rotation); other entries are ignored.

    Returns:
        The signed instant.

    Raises:
        MalformedSignatureError: no ``t=`` or no ``v1=`` entry.
        TimestampOutOfToleranceError: ``t`` is more than ``tolerance`` from ``now``.
        SignatureMismatchError: no entry matches.
    """
    keys = _keys(secrets)
    timestamp: str | None = None
    candidates: list[bytes] = []
    for part in header.split(",")[: _MAX_CANDIDATES + 1]:
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            timestamp = value
        elif name == "v1":
            try:
                candidates.append(bytes.fromhex(value))
            except ValueError:
                continue  # a malformed candidate simply never matches
    if timestamp is None or not candidates:
        raise MalformedSignatureError("Sonzai-Signature must be t=<unix>,v1=<hex>")
    ts = _parse_timestamp(timestamp)
    signed_at = _check_tolerance(ts, now, tolerance)
    prefix = f"{ts}.".encode()
    if not _matches([_hmac(k.sonzai_key, prefix, body) for k in keys], candidates):
        raise SignatureMismatchError("no Sonzai-Signature v1 matches a configured secret")
    return signed_at


def verify_standard(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Iterable[SecretLike],
    *,
    now: datetime,
    tolerance: timedelta = TOLERANCE,
) -> tuple[str, datetime]:
    """
    Verify Standard Webhooks headers (``webhook-id``, ``-timestamp``, ``-signature``).

    ``headers`` keys are matched case-insensitively. Any ``v1,<base64>`` entry matching
    any secret passes; other versions are ignored (spec: "verify any of them").

    Returns:
        ``(webhook-id, signed instant)``.

    Raises:
        MalformedSignatureError: a header is missing or unparseable.
        TimestampOutOfToleranceError: the timestamp is more than ``tolerance`` from ``now``.
        SignatureMismatchError: no signature matches.
    """
    keys = _keys(secrets)
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get(WEBHOOK_ID, "")
    raw_ts = lower.get(WEBHOOK_TIMESTAMP, "")
    raw_sig = lower.get(WEBHOOK_SIGNATURE, "")
    if not (msg_id and raw_ts and raw_sig):
        raise MalformedSignatureError(
            "webhook-id, webhook-timestamp and webhook-signature are all required"
        )
    ts = _parse_timestamp(raw_ts)
    signed_at = _check_tolerance(ts, now, tolerance)
    candidates: list[bytes] = []
    for entry in raw_sig.split(" ")[:_MAX_CANDIDATES]:
        version, sep, value = entry.partition(",")
        if not sep or version != "v1":
            continue
        try:
            candidates.append(base64.b64decode(value, validate=True))
        except binascii.Error:
            continue
    if not candidates:
        raise MalformedSignatureError("webhook-signature has no v1,<base64> entry")
    prefix = f"{msg_id}.{ts}.".encode()
    if not _matches([_hmac(k.standard_key, prefix, body) for k in keys], candidates):
        raise SignatureMismatchError("no webhook-signature v1 matches a configured secret")
    return msg_id, signed_at


@dataclass(frozen=True, slots=True)
class Verification:
    """What an authenticated request proved: the scheme, the signed instant, the id."""

    scheme: Scheme
    signed_at: datetime
    msg_id: str | None
    """``webhook-id`` for the Standard scheme; ``None`` for Sonzai (the id is in the body)."""


def verify(
    body: bytes,
    headers: Mapping[str, str],
    secrets: Iterable[SecretLike],
    *,
    now: datetime,
    tolerance: timedelta = TOLERANCE,
) -> Verification:
    """
    Authenticate a request signed with either scheme.

    Standard Webhooks headers are tried first when present (they also sign the id);
    ``Sonzai-Signature`` is tried when they are absent or do not verify. A request
    passes when either scheme verifies.

    Raises:
        MissingSignatureError: neither scheme's headers are present.
        SignatureError: the most specific failure (the Standard scheme's when both fail).
    """
    keys = _keys(secrets)
    lower = {k.lower(): v for k, v in headers.items()}
    has_standard = any(lower.get(h) for h in (WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE))
    sonzai_header = lower.get(SONZAI_SIGNATURE)
    if not has_standard and not sonzai_header:
        raise MissingSignatureError(
            "send Sonzai-Signature or the webhook-id/-timestamp/-signature headers"
        )
    first_error: SignatureError | None = None
    if has_standard:
        try:
            msg_id, signed_at = verify_standard(body, lower, keys, now=now, tolerance=tolerance)
        except SignatureError as exc:
            first_error = exc
        else:
            return Verification(Scheme.STANDARD, signed_at, msg_id)
    if sonzai_header:
        try:
            signed_at = verify_sonzai(body, sonzai_header, keys, now=now, tolerance=tolerance)
        except SignatureError as exc:
            first_error = first_error or exc
        else:
            return Verification(Scheme.SONZAI, signed_at, None)
    # At least one branch ran and failed, so first_error is set.
    raise first_error or SignatureMismatchError("no signature verified")
