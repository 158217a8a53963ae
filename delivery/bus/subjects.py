"""
Subject names and stream settings, as constants (one place for every producer and consumer).

Every subject is ``<prefix>.<noun>.<past-tense verb>``; the
prefix is ``Settings.subject_prefix`` (``delivery`` in production, unique per
test). The outbox ``msg_id`` of each message is the id named below, sent as
``Nats-Msg-Id`` so JetStream drops a republished duplicate.
"""

from dataclasses import dataclass

FIRE_CREATED = "fire.created"
"""A schedule fire row was committed; msg id = fire id."""
WAKEUP_DUE = "wakeup.due"
"""A wakeup reached its time and was claimed; msg id = wakeup id."""
EVENT_ACCEPTED = "event.accepted"
"""A trigger event was accepted by the API; msg id = event id."""
NOTIFICATION_CREATED = "notification.created"
"""A notification row was inserted; msg id = notification (message) id. Handlers consume it."""

DEFAULT_SUBJECT_PREFIX = "delivery"
"""``Settings.subject_prefix`` unless configured."""

DEDUPE_WINDOW_S = 2 * 3600
"""JetStream duplicate window: longer than any outbox relay retry, so a replay is dropped."""


@dataclass(frozen=True, slots=True)
class Subjects:
    """The concrete subjects for one prefix."""

    prefix: str

    @property
    def stream(self) -> str:
        """Stream name: NATS stream names cannot contain dots."""
        return self.prefix.replace(".", "_").upper()

    @property
    def wildcard(self) -> str:
        return f"{self.prefix}.>"

    @property
    def fire_created(self) -> str:
        return f"{self.prefix}.{FIRE_CREATED}"

    @property
    def wakeup_due(self) -> str:
        return f"{self.prefix}.{WAKEUP_DUE}"

    @property
    def event_accepted(self) -> str:
        return f"{self.prefix}.{EVENT_ACCEPTED}"

    @property
    def notification_created(self) -> str:
        return f"{self.prefix}.{NOTIFICATION_CREATED}"
