"""
FCM push over the HTTP v1 API (``messages:send``) with httpx, authenticated by an OAuth2
access token minted from a service-account key and cached until shortly before expiry.

References:
    * Send: https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send
    * Errors: https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode
    * Token: https://developers.google.com/identity/protocols/oauth2/service-account
      ("Preparing to make an authorized API call" / HTTP/REST), i.e. RFC 7523.

Channel contract: :meth:`FcmChannel.send` never raises for provider or network trouble;
it returns :class:`Delivered`, :class:`Retry` (optionally with the server's Retry-After)
or :class:`Failed` (``disable_destination=True`` when the device token is dead).
"""

import asyncio
import json
import json.encoder
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Self

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

FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
GOOGLE_TOKEN_URL: Final = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL
JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Google caps self-signed assertions at one hour.
ASSERTION_LIFETIME: Final = timedelta(hours=1)
#: Refresh this long before the access token expires; the same threshold google-auth
#: uses (``google.auth._helpers.REFRESH_THRESHOLD``), so a token never expires in flight.
REFRESH_MARGIN: Final = timedelta(minutes=3, seconds=45)
#: FCM rejects messages whose payload exceeds 4096 bytes; the body is cut well below
#: that so title, data and JSON framing always fit.
MAX_BODY_BYTES: Final = 2048
MAX_TITLE_BYTES: Final = 256

_FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE: Final = "type.googleapis.com/google.rpc.BadRequest"
# FcmError codes after which the token will never work again: the app was uninstalled or
# the token expired (UNREGISTERED), or it belongs to another Firebase project
# (SENDER_ID_MISMATCH). Firebase's guidance is to delete such tokens.
_DEAD_TOKEN_CODES: Final = frozenset({"UNREGISTERED", "SENDER_ID_MISMATCH"})
# Retry with backoff; QUOTA_EXCEEDED and UNAVAILABLE may carry Retry-After.
_TRANSIENT_CODES: Final = frozenset({"QUOTA_EXCEEDED", "UNAVAILABLE", "INTERNAL"})
# The encoding httpx's ``json=`` uses (compact, UTF-8, no NaN), which
# :func:`fcm_request_body` writes.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_quoted: Final[Callable[[str], str]] = json.encoder.encode_basestring
"""A JSON string literal, escaped as ``_JSON`` escapes it (``ensure_ascii=False``)."""


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The fields of a Google service-account key file that FCM needs."""

    project_id: str
    client_email: str
    private_key: str = field(repr=False)
    private_key_id: str = ""
    token_uri: str = GOOGLE_TOKEN_URL

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        """
        Build from the parsed key file (``type: service_account``).

        Raises:
            ValueError: a required field is missing or not a string.
        """
        missing = [
            key
            for key in ("project_id", "client_email", "private_key")
            if not isinstance(data.get(key), str) or not data[key]
        ]
        if missing:
            raise ValueError(f"service account JSON lacks {', '.join(missing)}")
        # Imported here: cryptography loads only in a process with FCM configured.
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        try:
            # Fail at start-up, not on the first send, when the key is not a usable
            # RSA private key (Google issues PKCS#8 PEM RSA keys).
            key = serialization.load_pem_private_key(data["private_key"].encode(), None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"service account private_key is unusable: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("service account private_key must be an RSA key (RS256)")
        return cls(
            project_id=data["project_id"],
            client_email=data["client_email"],
            private_key=data["private_key"],
            private_key_id=str(data.get("private_key_id") or ""),
            token_uri=str(data.get("token_uri") or GOOGLE_TOKEN_URL),
        )

    @classmethod
    def from_file(cls, path: Path) -> Self:
        """
        Read a key file; called once at start-up (blocking I/O is fine there).

        Raises:
            OSError: the file cannot be read.
            ValueError: it is not a service-account key.
        """
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


class FcmAuthError(Exception):
    """
    The access token could not be obtained; carries the :data:`Outcome` to report.

    Raised only by :class:`GoogleAccessTokens` and turned into a ``Retry`` or ``Failed``
    by :class:`FcmChannel`; it never escapes ``send``.
    """

    def __init__(self, outcome: Retry | Failed) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class GoogleAccessTokens:
    """
    OAuth2 access tokens for one service account, via the JWT bearer grant (RFC 7523).

    A token is reused until :data:`REFRESH_MARGIN` before its ``expires_in`` (or half
    its lifetime, if that is shorter); concurrent callers share one refresh.
    :meth:`invalidate` drops a token the API rejected with 401.

    Args:
        account: the service account that signs the assertion.
        client: the caller-owned httpx client (closing it is the caller's job).
        clock: source of ``iat``/``exp`` and of "is the cached token still fresh".
        token_url: the token endpoint; also the assertion's ``aud``.
    """

    def __init__(
        self,
        account: ServiceAccount,
        *,
        client: httpx.AsyncClient,
        clock: Clock,
        token_url: str | None = None,
    ) -> None:
        self._account = account
        self._client = client
        self._clock = clock
        self._token_url = token_url or account.token_uri
        self._token: str | None = None
        self._refresh_at: datetime | None = None
        self._lock = asyncio.Lock()

    def assertion(self, now: datetime) -> str:
        """The signed RS256 JWT that is exchanged for an access token (pure given ``now``)."""
        import jwt  # with cryptography, only in a process that sends FCM pushes

        iat = int(now.timestamp())
        claims = {
            "iss": self._account.client_email,
            "scope": FCM_SCOPE,
            "aud": self._token_url,
            "iat": iat,
            "exp": iat + int(ASSERTION_LIFETIME.total_seconds()),
        }
        headers = {"kid": self._account.private_key_id} if self._account.private_key_id else None
        return jwt.encode(claims, self._account.private_key, algorithm="RS256", headers=headers)

    async def get(self) -> str:
        """
        A valid access token, from the cache or a fresh exchange.

        Raises:
            FcmAuthError: the exchange failed; ``outcome`` is ``Retry`` for network
                trouble, 429 and 5xx, else ``Failed`` (bad key, revoked account).
        """
        if (token := self._fresh()) is not None:
            return token
        async with self._lock:
            if (token := self._fresh()) is not None:
                return token
            return await self._exchange()

    def invalidate(self, token: str) -> None:
        """Forget ``token`` if it is still the cached one (another caller may have refreshed)."""
        if self._token == token:
            self._token = None
            self._refresh_at = None

    def _fresh(self) -> str | None:
        if self._token is None or self._refresh_at is None:
            return None
        if self._clock.now() >= self._refresh_at:
            return None
        return self._token

    async def _exchange(self) -> str:
        now = self._clock.now()
        try:
            # The key is a few KB of RSA; signing takes ~1 ms and happens once an hour.
            response = await self._client.post(
                self._token_url,
                data={"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion(now)},
                headers={"Accept": "application/json"},
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            # Unreachable or timed out; even a bad URL is worth retrying here, because the
            # operator fixing DELIVERY_FCM_TOKEN_URL makes the queued messages go out.
            raise FcmAuthError(Retry(f"fcm token endpoint unreachable: {exc!r}")) from exc
        if response.status_code != 200:
            reason = f"fcm token exchange failed: {response.status_code} {_oauth_error(response)}"
            log.error("fcm.token.failed", status_code=response.status_code, reason=reason)
            if response.status_code == 429 or response.status_code >= 500:
                after = parse_retry_after(response.headers.get("Retry-After"), now=now)
                raise FcmAuthError(Retry(reason, response.status_code, after))
            raise FcmAuthError(Failed(reason, response.status_code))
        try:
            body = response.json()
            token = body["access_token"]
            expires_in = int(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError) as exc:
            raise FcmAuthError(Retry(f"fcm token endpoint sent an unusable body: {exc!r}")) from exc
        if not isinstance(token, str) or not token:
            raise FcmAuthError(Retry("fcm token endpoint sent an empty access_token"))
        lifetime = timedelta(seconds=max(expires_in, 0))
        self._token = token
        # Refresh REFRESH_MARGIN early, but never more than halfway through a short-lived
        # token, or every send would fetch a new one.
        self._refresh_at = now + lifetime - min(REFRESH_MARGIN, lifetime / 2)
        log.info("fcm.token.refreshed", expires_at=(now + lifetime).isoformat())
        return token


def _oauth_error(response: httpx.Response) -> str:
    # RFC 6749 section 5.2: {"error": "invalid_grant", "error_description": "..."}
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        return f"{body.get('error', '')}: {body.get('error_description', '')}".strip(": ")
    return str(body)[:200]


def build_fcm_payload(
    message: Message, token: str, *, default_title: str = "New message"
) -> dict[str, Any]:
    """
    The ``messages:send`` request body for ``message`` to device ``token`` (pure).

    ``notification`` carries what the OS shows (title from ``payload["title"]`` when it
    is a string, else ``default_title``; body is the generated message, cut to
    :data:`MAX_BODY_BYTES`). ``data`` carries ids so the app can fetch or dedupe the
    notification; FCM requires every data value to be a string.
    """
    title = _title(message, default_title)
    data = {
        "event_id": message.event_id,
        "event_type": message.event_type,
        "message_id": message.message_id,
        "agent_id": message.agent_id,
        "user_id": message.user_id,
        "check_type": message.check_type,
        "created_at": message.created_at.isoformat(),
    }
    return {
        "message": {
            "token": token,
            "notification": {
                "title": truncate_utf8(title, MAX_TITLE_BYTES),
                "body": truncate_utf8(message.generated_message, MAX_BODY_BYTES),
            },
            "data": data,
        }
    }


def fcm_request_body(message: Message, token: str, *, default_title: str = "New message") -> bytes:
    """
    The bytes httpx's ``json=`` writes for :func:`build_fcm_payload` (pure), written
    directly: the dict and its encoding were about 3% of the channels worker's CPU in
    ``bench/bench_channels_worker.py``, where most of the body is fixed. Each string
    goes through the encoder's own escaping (``encode_basestring``, as ``_JSON``'s
    ``ensure_ascii=False`` does); ``tests/handlers/channels/test_fcm.py`` checks the
    bytes equal ``_JSON``'s encoding of the dict.
    """
    q = _quoted
    title = truncate_utf8(_title(message, default_title), MAX_TITLE_BYTES)
    return (
        f'{{"message":{{"token":{q(token)},"notification":{{"title":{q(title)},'
        f'"body":{q(truncate_utf8(message.generated_message, MAX_BODY_BYTES))}}},'
        f'"data":{{"event_id":{q(message.event_id)},"event_type":{q(message.event_type)},'
        f'"message_id":{q(message.message_id)},"agent_id":{q(message.agent_id)},'
        f'"user_id":{q(message.user_id)},"check_type":{q(message.check_type)},'
        f'"created_at":{q(message.created_at.isoformat())}}}}}}}'
    ).encode()


def _title(message: Message, default_title: str) -> str:
    title = message.payload.get("title")
    if not isinstance(title, str) or not title.strip():
        return default_title
    return title


def truncate_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, ending in "…" when cut (pure)."""
    if len(text.encode("utf-8")) <= max_bytes:
        return text
    ellipsis = "…"
    budget = max_bytes - len(ellipsis.encode("utf-8"))
    cut = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    return cut.rstrip() + ellipsis


def classify_fcm_error(status_code: int, body: Any, retry_after: timedelta | None) -> Outcome:
    """
    Map a non-2xx ``messages:send`` answer to an outcome (pure), per the FCM ErrorCode doc.

    * ``UNREGISTERED`` (404) and ``SENDER_ID_MISMATCH`` (403): the token is dead ->
      ``Failed(disable_destination=True)``.
    * ``INVALID_ARGUMENT`` (400) about the token (a ``BadRequest`` field violation on
      ``message.token``, or a message naming the registration token) -> disable too;
      any other ``INVALID_ARGUMENT`` is a payload bug on our side -> ``Failed`` only,
      so one bad message never prunes a good token.
    * ``QUOTA_EXCEEDED`` (429), ``UNAVAILABLE`` (503), ``INTERNAL`` (500), any 429 or
      5xx -> ``Retry`` carrying Retry-After.
    * Anything else (``THIRD_PARTY_AUTH_ERROR``, ``PERMISSION_DENIED``, a 401 that
      survived a token refresh) -> ``Failed``: a configuration problem, not the token's.
    """
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    status = str(error.get("status", ""))
    text = str(error.get("message", ""))
    fcm_code = ""
    token_violation = False
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == _FCM_ERROR_TYPE:
            fcm_code = str(detail.get("errorCode", ""))
        elif detail.get("@type") == _BAD_REQUEST_TYPE:
            violations = detail.get("fieldViolations")
            token_violation = token_violation or any(
                isinstance(v, dict) and v.get("field") == "message.token"
                for v in (violations if isinstance(violations, list) else [])
            )
    code = fcm_code or status or str(status_code)
    reason = f"fcm {code}: {text}" if text else f"fcm {code}"
    if code in _DEAD_TOKEN_CODES:
        return Failed(reason, status_code, disable_destination=True)
    if code == "INVALID_ARGUMENT":
        about_token = token_violation or "registration token" in text.lower()
        return Failed(reason, status_code, disable_destination=about_token)
    if code in _TRANSIENT_CODES or status_code == 429 or status_code >= 500:
        return Retry(reason, status_code, retry_after)
    return Failed(reason, status_code)


class FcmChannel:
    """
    :class:`~handlers.base.Channel` for FCM device tokens (``ContactKind.FCM``).

    Args:
        account: the service account; its ``project_id`` is the FCM project.
        client: caller-owned httpx client; set its timeout there (the daemon owns one
            client for all HTTP channels).
        clock: for token freshness and Retry-After dates.
        base_url: FCM API root (settings ``fcm_base_url``); tests use a local stand-in.
        token_url: OAuth2 token endpoint (settings ``fcm_token_url``); defaults to the
            key file's ``token_uri``.
        default_title: notification title when ``payload["title"]`` is absent.
    """

    kind: Final = ContactKind.FCM

    def __init__(
        self,
        account: ServiceAccount,
        *,
        client: httpx.AsyncClient,
        clock: Clock,
        base_url: str = "https://fcm.googleapis.com",
        token_url: str | None = None,
        default_title: str = "New message",
    ) -> None:
        self._account = account
        self._client = client
        self._clock = clock
        self._url = f"{base_url.rstrip('/')}/v1/projects/{account.project_id}/messages:send"
        self._post_direct = DirectPost(client, self._url)
        self._tokens = GoogleAccessTokens(account, client=client, clock=clock, token_url=token_url)
        self._default_title = default_title

    @classmethod
    def from_settings(cls, settings: Settings, *, client: httpx.AsyncClient, clock: Clock) -> Self:
        """
        Build from ``DELIVERY_FCM_*`` settings.

        Raises:
            ValueError: ``fcm_service_account_file`` is unset or not a service-account key.
            OSError: the key file cannot be read.
        """
        if settings.fcm_service_account_file is None:
            raise ValueError("DELIVERY_FCM_SERVICE_ACCOUNT_FILE is not set")
        return cls(
            ServiceAccount.from_file(settings.fcm_service_account_file),
            client=client,
            clock=clock,
            base_url=settings.fcm_base_url,
            token_url=settings.fcm_token_url,
        )

    async def send(self, message: Message, destination: str) -> Outcome:
        """
        Push ``message`` to the device token ``destination``.

        A 401 (other than ``THIRD_PARTY_AUTH_ERROR``) drops the cached access token and
        the send is repeated once with a fresh one. Never raises for network or
        provider errors.
        """
        body = fcm_request_body(message, destination, default_title=self._default_title)

        def bound() -> Any:
            # Bound only when there is something to log: a bind per send was a few
            # per cent of the channels worker's CPU.
            return log.bind(event_id=message.event_id, token=redact(self.kind, destination))

        try:
            token = await self._tokens.get()
            response = await self._post(token, body)
            if response.status_code == 401 and not _third_party_auth(response):
                bound().info("fcm.send.unauthenticated_refreshing")
                self._tokens.invalidate(token)
                token = await self._tokens.get()
                response = await self._post(token, body)
        except FcmAuthError as exc:
            bound().warning(
                "fcm.send.auth_failed",
                outcome=type(exc.outcome).__name__,
                reason=exc.outcome.reason,
            )
            return exc.outcome
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            outcome = classify_exception(exc)
            bound().warning(
                "fcm.send.transport_error", error=repr(exc), outcome=type(outcome).__name__
            )
            return outcome
        if response.status_code == 200:
            name = _json_or_none(response)
            detail = name.get("name", "") if isinstance(name, dict) else ""
            return Delivered(200, str(detail))
        outcome = classify_fcm_error(
            response.status_code,
            _json_or_none(response),
            parse_retry_after(response.headers.get("Retry-After"), now=self._clock.now()),
        )
        bound().warning(
            "fcm.send.failed",
            status_code=response.status_code,
            outcome=type(outcome).__name__,
            reason=outcome.reason if not isinstance(outcome, Delivered) else "",
        )
        return outcome

    async def _post(self, token: str, body: bytes) -> httpx.Response:
        return await self._post_direct(
            body,
            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _third_party_auth(response: httpx.Response) -> bool:
    # THIRD_PARTY_AUTH_ERROR is a 401 about the APNs certificate or web-push key, not
    # about our access token: refreshing cannot fix it.
    return "THIRD_PARTY_AUTH_ERROR" in response.text
