"""
Webhooks: signing and verification (PURE, :mod:`.signing`), the outbound
:class:`~handlers.webhooks.sender.WebhookChannel`, and the tenant-side receiver router.
"""

from handlers.webhooks.receiver import (
    Dedupe,
    Forwarder,
    InMemoryDedupe,
    LoggingForwarder,
    VerifiedEvent,
    create_receiver_app,
    create_receiver_router,
)
from handlers.webhooks.sender import (
    AttemptStatus,
    WebhookAttempt,
    WebhookChannel,
    WebhookDelivery,
    WebhookEndpoint,
)
from handlers.webhooks.signing import active_secrets, generate_secret, sign, verify

__all__ = [
    "AttemptStatus",
    "Dedupe",
    "Forwarder",
    "InMemoryDedupe",
    "LoggingForwarder",
    "VerifiedEvent",
    "WebhookAttempt",
    "WebhookChannel",
    "WebhookDelivery",
    "WebhookEndpoint",
    "active_secrets",
    "create_receiver_app",
    "create_receiver_router",
    "generate_secret",
    "sign",
    "verify",
]
