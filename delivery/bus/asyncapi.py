"""
The AsyncAPI 3.0 document of what travels between the parts and to receivers: the
NATS subjects with their payloads, and the signed webhook a receiver gets.

Built from the payload models themselves (:mod:`delivery.bus.messages`), so it
cannot drift from what is sent; ``deploy/asyncapi.json`` is this document for the
default prefix, regenerated with ``python -m delivery.bus.asyncapi`` and checked
against the code by the tests.
"""

import json
import sys
from typing import Any

from pydantic import BaseModel

from delivery import __version__
from delivery.bus.messages import (
    EventAccepted,
    FireCreated,
    NotificationCreated,
    NotificationEvent,
    WakeupDue,
)
from delivery.bus.stream import MSG_ID_HEADER
from delivery.bus.subjects import (
    DEFAULT_SUBJECT_PREFIX,
    EVENT_ACCEPTED,
    FIRE_CREATED,
    NOTIFICATION_CREATED,
    WAKEUP_DUE,
)

_SUBJECTS: tuple[tuple[str, type[BaseModel], str, str], ...] = (
    (FIRE_CREATED, FireCreated, "scheduler", "the fire id"),
    (WAKEUP_DUE, WakeupDue, "scheduler", "the wakeup id"),
    (EVENT_ACCEPTED, EventAccepted, "API", "the event id"),
    (NOTIFICATION_CREATED, NotificationCreated, "dispatcher", "the notification id"),
)

_WEBHOOK_HEADERS: dict[str, Any] = {
    "type": "object",
    "required": ["Sonzai-Signature", "webhook-id", "webhook-timestamp", "webhook-signature"],
    "properties": {
        "Sonzai-Signature": {
            "type": "string",
            "description": "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<raw body>'>; one v1 "
            "per live signing secret during a rotation.",
        },
        "webhook-id": {
            "type": "string",
            "description": "The event id, the same on every retry (Standard Webhooks).",
        },
        "webhook-timestamp": {"type": "string", "description": "Unix seconds of this attempt."},
        "webhook-signature": {
            "type": "string",
            "description": "v1,<base64 HMAC-SHA256 of '<id>.<timestamp>.<raw body>'> "
            "(Standard Webhooks).",
        },
    },
}


def _name(subject: str) -> str:
    return "".join(part.capitalize() for part in subject.split("."))


def asyncapi_document(prefix: str = DEFAULT_SUBJECT_PREFIX) -> dict[str, Any]:
    """The AsyncAPI 3.0 document for subjects under ``prefix``."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for subject, model, sender, msg_id in _SUBJECTS:
        name = _name(subject)
        messages[name] = {
            "name": name,
            "title": f"{prefix}.{subject}",
            "summary": (model.__doc__ or "").strip().splitlines()[0],
            "contentType": "application/json",
            "headers": {
                "type": "object",
                "properties": {
                    MSG_ID_HEADER: {
                        "type": "string",
                        "description": f"{msg_id}: JetStream drops a republished duplicate.",
                    }
                },
            },
            "payload": model.model_json_schema(),
        }
        channels[name] = {
            "address": f"{prefix}.{subject}",
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        operations[f"publish{name}"] = {
            "action": "send",
            "summary": f"Published by the {sender} through the outbox.",
            "channel": {"$ref": f"#/channels/{name}"},
        }
    messages["NotificationEvent"] = {
        "name": "NotificationEvent",
        "title": "Webhook delivery",
        "summary": "POSTed to a registered webhook URL (and project channels), signed.",
        "contentType": "application/json",
        "headers": _WEBHOOK_HEADERS,
        "payload": NotificationEvent.model_json_schema(),
    }
    channels["Webhook"] = {
        "address": "{webhook_url}",
        "description": "The URL registered with PUT /api/v1/webhooks/{event_type}; a 2xx "
        "answer consumes the notification, anything else is retried with backoff.",
        "parameters": {"webhook_url": {"description": "The receiver's registered URL."}},
        "messages": {"NotificationEvent": {"$ref": "#/components/messages/NotificationEvent"}},
    }
    operations["deliverWebhook"] = {
        "action": "send",
        "summary": "Sent by the handlers for every notification of a subscribed event type.",
        "channel": {"$ref": "#/channels/Webhook"},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "sonzai-delivery messages",
            "version": __version__,
            "description": "NATS JetStream subjects between the parts (one stream per prefix, "
            "duplicates dropped by Nats-Msg-Id), and the webhook receivers get.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render(prefix: str = DEFAULT_SUBJECT_PREFIX) -> str:
    """The document as the committed file holds it."""
    return json.dumps(asyncapi_document(prefix), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m delivery.bus.asyncapi > deploy/asyncapi.json
    sys.stdout.write(render())
