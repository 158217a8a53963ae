"""
The plain values that cross layers: what fired (:class:`SourceRef`), what a composer
receives (:class:`IntentBlock`), what a notification is made from (:class:`Draft`),
and what a scheduler tick did (:class:`TickResult`).

Pure: no clock, no I/O; it imports nothing of the store, the bus or the processes,
so every layer above may use it.
"""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, NewType

from delivery import jsontext
from delivery.cadence.window import Window
from delivery.policy import DEFAULT_SOURCE, SourcePolicy

FireId = NewType("FireId", str)
"""A schedule fire's id, derived from (schedule id, fire instant)."""


def earliest(*instants: datetime | None) -> datetime | None:
    """The earliest of the instants given, ignoring None; None when all are."""
    present = [i for i in instants if i is not None]
    return min(present) if present else None


class SourceKind(StrEnum):
    """What produced a notification; the values are the payload's ``source_type``."""

    SCHEDULE = "schedule"
    WAKEUP = "wakeup"
    EVENT = "event"


EVENT_TYPES: Mapping[SourceKind, str] = {
    SourceKind.SCHEDULE: "on_recurring_event_due",
    SourceKind.WAKEUP: "on_wakeup_ready",
    SourceKind.EVENT: "on_trigger_event",
}
"""Webhook event type per source."""


@dataclass(frozen=True, slots=True)
class InventoryItem:
    """The live inventory item a schedule or wakeup references, read at fire time."""

    label: str
    properties: Mapping[str, Any]

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The properties as rendered: sorted by key, non-strings as compact JSON."""
        return sorted_pairs(self.properties)


@dataclass(frozen=True, slots=True)
class IntentBlock:
    """
    What a composer receives: the rendered block plus the structured parts.

    Attributes:
        kind: the source kind.
        text: the intent block exactly as the agent sees it.
        intent: the client's ``intent`` (for an event, its description).
        check_type: the client's ``check_type`` (for an event, its type).
        fire_at_local: the fire instant as rendered in the block.
        item: the referenced inventory item, when it still exists.
        context: ``metadata`` pairs, in the order rendered.
        details: the wakeup / event fields rendered (label -> value).
    """

    kind: SourceKind
    text: str
    intent: str
    check_type: str
    fire_at_local: str
    item: InventoryItem | None = None
    context: tuple[tuple[str, str], ...] = ()
    details: tuple[tuple[str, str], ...] = field(default=())


def scalar_text(value: Any) -> str:
    """Strings verbatim; anything else as compact JSON (numbers, lists, objects)."""
    if isinstance(value, str):
        return value
    return jsontext.canonical(value)


def payload_json(payload: Mapping[str, Any]) -> str:
    """A notification's stored payload (the webhook body's fields): compact, keys sorted."""
    return jsontext.sorted_ascii(payload)


def sorted_pairs(mapping: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    # Sorted, so both databases (PostgreSQL jsonb reorders keys) render the same
    # block and advance-time stays deterministic.
    if not mapping:
        return ()
    return tuple((str(k), scalar_text(mapping[k])) for k in sorted(mapping))


def notification_id(source_id: str) -> str:
    """
    The notification (message) id of a source: ``msg_`` + 24 hex of SHA-256(source id).

    Deterministic, so a replay, a second dispatcher or advance-time run on the
    same state all name the same notification.
    """
    return "msg_" + hashlib.sha256(source_id.encode()).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class SourceRef:
    """
    One message's subject: what fired, by id.

    ``replace_staged`` (a restage message, :func:`delivery.store.staging.restage_fires`)
    lets the source be composed again over its ``staged`` notification, which
    may have been written from a state the API has since changed. Equality
    ignores it: it is still the same source.
    """

    kind: SourceKind
    id: str
    replace_staged: bool = field(default=False, compare=False)
    offset_s: float = field(default=0.0, compare=False)
    """The source's pair clock offset: its notification is stamped on that clock."""


@dataclass(frozen=True, slots=True)
class Draft:
    """
    Everything a notification needs except the composed message.

    ``source_id`` is the fire id, wakeup id or event id the notification is
    unique on; exactly one of ``schedule_id`` / ``wakeup_id`` /
    ``trigger_event_id`` is set, matching ``block.kind``.
    """

    source_id: str
    project_id: str
    agent_id: str
    user_id: str
    fire_at: datetime
    block: IntentBlock
    metadata: Mapping[str, Any]
    schedule_id: str | None = None
    wakeup_id: str | None = None
    trigger_event_id: str | None = None
    policy: SourcePolicy = DEFAULT_SOURCE
    """What the source says about its messages (priority, deadline, ...)."""
    next_fire_at: datetime | None = None
    """A schedule's next regular fire: a deferred message never goes out after it."""
    window: Window | None = None
    """A deferring schedule's active window: a fire outside it waits for its opening."""

    @property
    def notification_id(self) -> str:
        return notification_id(self.source_id)


@dataclass(slots=True)
class TickResult:
    """
    What one :meth:`Scheduler.tick` did.

    Attributes:
        claimed: schedules claimed this tick.
        fired: fire rows inserted with ``status='fired'`` (each has one outbox row).
        skipped: fire rows inserted with ``status='skipped'``.
        conflicts: planned fires whose (schedule_id, fire_at) row already
            existed. Claims make this 0 in normal operation; it is reported so
            tests can prove the unique constraint was never needed.
        stale: claimed schedules dropped because the API changed them (version).
        failed: claimed schedules whose cadence could not be compiled.
        disabled: schedules disabled because ``ends_at`` passed.
        wakeups: wakeups claimed and queued for the dispatcher.
        outbox: outbox rows written for the relay to publish now (handed-off
            fires' rows are held, not counted).
        handed: fires handed to the dispatcher in this process (:mod:`delivery.handoff`).
        more: a batch was full, so more rows may be due right now.
        fire_ids: the ids of the fires inserted.
        next_release: the earliest fire instant after ``now`` among the fires
            this tick staged ahead (lookahead), so the relay can be woken
            exactly then to promote their notifications.
    """

    claimed: int = 0
    fired: int = 0
    skipped: int = 0
    conflicts: int = 0
    stale: int = 0
    failed: int = 0
    disabled: int = 0
    wakeups: int = 0
    outbox: int = 0
    handed: int = 0
    more: bool = False
    fire_ids: list[FireId] = field(default_factory=list)
    next_release: datetime | None = None

    def add(self, other: "TickResult") -> None:
        """Accumulate ``other`` into this result (used by :meth:`Scheduler.drain`)."""
        self.claimed += other.claimed
        self.fired += other.fired
        self.skipped += other.skipped
        self.conflicts += other.conflicts
        self.stale += other.stale
        self.failed += other.failed
        self.disabled += other.disabled
        self.wakeups += other.wakeups
        self.handed += other.handed
        self.outbox += other.outbox
        self.more = other.more
        self.fire_ids.extend(other.fire_ids)
        self.next_release = earliest(self.next_release, other.next_release)
