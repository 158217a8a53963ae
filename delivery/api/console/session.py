"""
The console's session: the API key a person signed in with, kept in a cookie.

The cookie is ``HttpOnly`` and ``SameSite=Strict``, and its value is the key sealed
with the deployment's :class:`~delivery.secrets.SecretBox` (so it is unreadable even
to a script that could see it) plus a CSRF token, signed with ``itsdangerous`` and a
key derived from the same material (so it cannot be forged or replayed past
:data:`MAX_AGE_S`). Every request opens it and resolves the key again through the
API's :class:`~delivery.api.auth.Authenticator`: a revoked key ends the session
within the authenticator's cache lifetime, and the console sees exactly the key's
project, as the API does.
"""

import hmac
import json
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from delivery.secrets import SecretBox, SecretDecryptError

COOKIE = "delivery_console"
"""The session cookie's name."""
PRE_COOKIE = "delivery_console_signin"
"""The sign-in form's CSRF cookie (double submit: the form carries the same token)."""
MAX_AGE_S = 12 * 3600
"""A session lasts twelve hours from sign-in."""
_SALT = "delivery.console.session"


@dataclass(frozen=True, slots=True)
class Session:
    """An opened session cookie: the API key and the CSRF token its forms carry."""

    api_key: str
    csrf: str


class SessionCodec:
    """Seals and signs session cookies, and opens them; ``None`` for anything not ours."""

    def __init__(self, box: SecretBox) -> None:
        self._box = box
        self._signer = URLSafeTimedSerializer(box.digest(_SALT), salt=_SALT)

    def issue(self, api_key: str) -> tuple[str, Session]:
        """A new session for ``api_key``: the cookie value and what it holds."""
        session = Session(api_key=api_key, csrf=secrets.token_urlsafe(24))
        value = self._signer.dumps({"k": self._box.seal(api_key), "c": session.csrf})
        return value, session

    def open(self, value: str | None) -> Session | None:
        """The session in a cookie value; ``None`` when absent, forged, expired or unreadable."""
        if not value:
            return None
        try:
            data = self._signer.loads(value, max_age=MAX_AGE_S)
            if not isinstance(data, dict):
                return None
            key = self._box.open(str(data["k"]))
            csrf = str(data["c"])
        except (
            BadSignature,
            SecretDecryptError,
            KeyError,
            TypeError,
            ValueError,
            json.JSONDecodeError,
        ):
            return None
        return Session(api_key=key, csrf=csrf)


def new_token() -> str:
    """A fresh CSRF token (the sign-in form's)."""
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, given: str | None) -> bool:
    """Whether a form's CSRF token is the expected one (constant time; empty never is)."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())
