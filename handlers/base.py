"""
The handler seam: every channel sends one message and reports an :data:`Outcome`.

Retry timing is not the channel's business: a channel says *whether* a failure is
transient (``Retry``, optionally with the server's ``Retry-After``) or permanent
(``Failed``); ``handlers.retry`` decides *when* to try again.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Message:
    """
    One proactive message as every channel sees it (the DESIGN decision 3 payload).

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
