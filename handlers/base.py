"""
The handler seam: every channel sends one message and reports an :data:`Outcome`.

Retry timing is not the channel's business: a channel says *whether* a failure is
transient (``Retry``, optionally with the server's ``Retry-After``) or permanent
(``Failed``); ``handlers.retry`` decides *when* to try again.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Message:
    """
    One proactive message as every channel sees it (the webhook payload).

    ``event_id`` is stable across retries and redeliveries: receivers dedupe on it.
    """

    event_id: str
    event_type: str
    project_id: str
    agent_id: str
    user_id: str
    message_id: str
    check_type: str
    intent: str
    generated_message: str
    created_at: datetime
    payload: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of_notification(
        cls, row: Mapping[Any, Any], *, event_id: str | None = None, event_type: str | None = None
    ) -> "Message":
        """
        The message of a stored notification row (its ``payload_json`` is the payload).

        Args:
            event_id: the delivery's own event id (a webhook delivery's); by default
                the payload's ``event_id``, else the notification id.
            event_type: the delivery's event type; the row's by default.
        """
        payload: dict[str, Any] = json.loads(row["payload_json"] or "{}")
        if event_id is None:
            stored = payload.get("event_id")
            event_id = stored if isinstance(stored, str) and stored else row["id"]
        return cls(
            event_id=event_id,
            event_type=event_type if event_type is not None else row["event_type"],
            project_id=row["project_id"],
            agent_id=row["agent_id"],
            user_id=row["user_id"],
            message_id=row["id"],
            check_type=row["check_type"],
            intent=row["intent"],
            generated_message=row["generated_message"],
            created_at=row["created_at"],
            payload=payload,
        )


@dataclass(frozen=True, slots=True)
class Delivered:
    """The destination accepted the message."""

    status_code: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure; ``after`` carries the server's Retry-After when it sent one."""

    reason: str
    status_code: int = 0
    after: timedelta | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """A permanent failure: retrying cannot help (bad token, 4xx, invalid address)."""

    reason: str
    status_code: int = 0
    disable_destination: bool = False


Outcome = Delivered | Retry | Failed


class Channel(Protocol):
    """A way out for a message: webhook, FCM, email, SMS."""

    async def send(self, message: Message, destination: str) -> Outcome:
        """Send ``message`` to one ``destination`` (URL, device token, address, number)."""
        ...
