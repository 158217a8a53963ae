"""
The one error tree. Every member carries a stable ``code`` and an HTTP ``status``.

The API turns any :class:`DeliveryError` into
``{"code", "message", "errors": [{"field", "message", "code"}]}`` (the shape the SDK
parses); nothing else maps exceptions to responses.

    DeliveryError
    ├── BadRequestError (400)
    │   ├── InvalidTimezoneError         INVALID_TIMEZONE
    │   ├── InvalidCadenceError          INVALID_CADENCE
    │   ├── InvalidActiveWindowError     INVALID_ACTIVE_WINDOW
    │   ├── InvalidWindowError           INVALID_WINDOW
    │   ├── CadenceTooFrequentError      CADENCE_TOO_FREQUENT
    │   ├── CadenceTooDenseError         CADENCE_TOO_DENSE
    │   ├── InvalidIdError               INVALID_ID
    │   ├── InvalidLimitError            INVALID_LIMIT
    │   ├── InvalidRequestError          INVALID_REQUEST  (schema: missing field, wrong type)
    │   ├── InvalidContactError          INVALID_CONTACT
    │   ├── InvalidWebhookUrlError       INVALID_WEBHOOK_URL
    │   ├── InvalidTemplateError         INVALID_TEMPLATE (a message template that cannot render)
    │   └── UnsupportedChannelTypeError  UNSUPPORTED_CHANNEL_TYPE
    ├── UnauthorizedError (401)          UNAUTHORIZED
    ├── NotFoundError (404, LookupError) NOT_FOUND
    ├── RequestTimeoutError (408)        REQUEST_TIMEOUT  (the body did not arrive in time)
    ├── ConflictError (409)              CONFLICT
    │   ├── IdempotencyKeyReusedError    IDEMPOTENCY_KEY_REUSED
    │   └── InvalidStateError            INVALID_STATE (e.g. cancelling an executed wakeup)
    ├── RequestTooLargeError (413)       REQUEST_TOO_LARGE
    ├── HeadersTooLargeError (431)       HEADERS_TOO_LARGE
    ├── TooManyConnectionsError (503)    TOO_MANY_CONNECTIONS
    └── DatabaseUnavailableError (503)   DATABASE_UNAVAILABLE
"""

from typing import Any, ClassVar


class DeliveryError(Exception):
    """
    Root of every error we answer to a client.

    Args:
        field: the offending input's dotted path (``cadence.timezone``), or
            ``""`` when no single field is to blame.
        message: a sentence a developer can act on; it names the field.
    """

    code: ClassVar[str] = "INTERNAL"
    status: ClassVar[int] = 500

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def to_body(self) -> dict[str, Any]:
        """The wire body the sonzai SDK parses into ``APIError.code``/``.message``."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            body["errors"] = [{"field": self.field, "message": self.message, "code": self.code}]
        else:
            body["errors"] = []
        return body


class BadRequestError(DeliveryError, ValueError):
    """Input that breaks a rule; nothing was written."""

    code = "BAD_REQUEST"
    status = 400


class InvalidTimezoneError(BadRequestError):
    code = "INVALID_TIMEZONE"


class InvalidCadenceError(BadRequestError):
    code = "INVALID_CADENCE"


class InvalidActiveWindowError(BadRequestError):
    code = "INVALID_ACTIVE_WINDOW"


class InvalidWindowError(BadRequestError):
    """starts_at / ends_at are inconsistent or already over."""

    code = "INVALID_WINDOW"


class CadenceTooFrequentError(BadRequestError):
    code = "CADENCE_TOO_FREQUENT"


class CadenceTooDenseError(BadRequestError):
    code = "CADENCE_TOO_DENSE"


class ScheduledAtInPastError(BadRequestError):
    """An instant so far in the past that firing it now would be a surprise."""

    code = "SCHEDULED_AT_IN_PAST"


class UnsupportedEventTypeError(BadRequestError):
    """An event type this service never produces: registering it would be silent."""

    code = "UNSUPPORTED_EVENT_TYPE"


class InvalidIdError(BadRequestError):
    code = "INVALID_ID"


class InvalidLimitError(BadRequestError):
    code = "INVALID_LIMIT"


class InvalidRequestError(BadRequestError):
    """Schema-level failure: a missing field, a wrong type, malformed JSON."""

    code = "INVALID_REQUEST"


class InvalidContactError(BadRequestError):
    code = "INVALID_CONTACT"


class InvalidWebhookUrlError(BadRequestError):
    code = "INVALID_WEBHOOK_URL"


class InvalidTemplateError(BadRequestError):
    """A message template that does not compile, or fails on a sample block."""

    code = "INVALID_TEMPLATE"


class UnsupportedChannelTypeError(BadRequestError):
    code = "UNSUPPORTED_CHANNEL_TYPE"


class UnauthorizedError(DeliveryError):
    code = "UNAUTHORIZED"
    status = 401


class NotFoundError(DeliveryError, LookupError):
    """Unknown id, or one that belongs to another project (tenants never learn which)."""

    code = "NOT_FOUND"
    status = 404

    def __init__(self, field: str, message: str, resource: str = "") -> None:
        super().__init__(field, message)
        self.resource = resource

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        if self.resource:
            body["resource"] = self.resource
        return body


class ConflictError(DeliveryError):
    code = "CONFLICT"
    status = 409


class IdempotencyKeyReusedError(ConflictError):
    code = "IDEMPOTENCY_KEY_REUSED"


class InvalidStateError(ConflictError):
    code = "INVALID_STATE"


class RequestTimeoutError(DeliveryError):
    """The request body did not arrive within the server's body read time."""

    code = "REQUEST_TIMEOUT"
    status = 408


class RequestTooLargeError(DeliveryError):
    """The request body is larger than the server accepts; none of it was used."""

    code = "REQUEST_TOO_LARGE"
    status = 413


class HeadersTooLargeError(DeliveryError):
    """The request line and headers are longer than the server reads."""

    code = "HEADERS_TOO_LARGE"
    status = 431


class TooManyConnectionsError(DeliveryError):
    """The process already holds as many connections as it is allowed; retry later."""

    code = "TOO_MANY_CONNECTIONS"
    status = 503


class DatabaseUnavailableError(DeliveryError):
    """The database went away under the request; nothing was recorded, a retry is safe."""

    code = "DATABASE_UNAVAILABLE"
    status = 503
