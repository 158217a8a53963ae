"""
Payloads that travel on NATS, one pydantic model per subject, each with a ``version``.

They carry ids, not content: the consumer reads the row it names, so a message
redelivered after the row changed still acts on the current state, and the
notification insert (unique on the source id) makes the second delivery a no-op.
"""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    version: Literal[1] = 1


class FireCreated(_Payload):
    """``<prefix>.fire.created``: a schedule fire row was committed (status ``fired``)."""

    fire_id: str
    schedule_id: str
    fire_at: datetime
    restage: bool = False
    """Compose again, replacing a staged notification (see ``restage_fires`` in the store)."""
    offset_s: float = 0.0
    """How far the pair's clock runs ahead of real time (advance-time); ``fire_at`` is on it."""


class WakeupDue(_Payload):
    """``<prefix>.wakeup.due``: a pending wakeup reached ``scheduled_at`` (its fire time)."""

    wakeup_id: str
    fire_at: datetime
    offset_s: float = 0.0
    """How far the pair's clock runs ahead of real time (advance-time); ``fire_at`` is on it."""


class EventAccepted(_Payload):
    """``<prefix>.event.accepted``: the API accepted a trigger event."""

    event_id: str


class NotificationCreated(_Payload):
    """``<prefix>.notification.created``: a notification row exists; handlers fan it out."""

    notification_id: str
    project_id: str
    agent_id: str
    user_id: str
    event_type: str


class NotificationEvent(BaseModel):
    """
    The body a webhook receiver (and a project channel) gets for a notification,
    signed as sent. The dispatcher stores it with the notification, so every
    attempt sends the same bytes.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: str
    event_type: Literal["on_recurring_event_due", "on_wakeup_ready", "on_trigger_event"]
    created_at: str
    """RFC 3339 UTC (``Z``): when the notification was made."""
    project_id: str
    agent_id: str
    user_id: str
    message_id: str
    """The notification's id; consuming it by poll or by a 2xx here is the same act."""
    source_type: Literal["schedule", "wakeup", "event"]
    check_type: str
    intent: str
    generated_message: str
    fire_at: str
    """RFC 3339 UTC: the instant the source became due."""
    fire_at_local: str
    """The same instant in the user's zone, with its offset."""
    metadata: dict[str, object]
    schedule_id: str | None = None
    wakeup_id: str | None = None
    trigger_event_id: str | None = None
