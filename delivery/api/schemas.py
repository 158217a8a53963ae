"""
Request and response models, with the Sonzai wire names (those the SDK sends and parses).

Requests are strict and closed (``extra="forbid"``): the SDK never sends unknown
keys or top-level ``null``, so anything else is a client bug we
report as ``INVALID_REQUEST`` naming the field. Responses are dumped with
``exclude_none``: an absent optional is omitted, never ``null``.
"""

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

ID_PATTERN = r"^[A-Za-z0-9._:@+-]{1,128}$"
"""Every id in a path or an id-valued body field."""


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000, and a lone surrogate (valid JSON escape,
    # invalid UTF-8) cannot be stored at all; refusing both keeps them a 400.
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("must not contain unpaired surrogates") from None
    return value


Clean = AfterValidator(_no_nul)
Text = Annotated[str, Field(min_length=1, max_length=8000), Clean]
OptionalText = Annotated[str, Field(max_length=8000), Clean]
Label = Annotated[str, Field(min_length=1, max_length=128), Clean]
Ident = Annotated[str, Field(pattern=ID_PATTERN)]

MAX_METADATA_KEYS = 64
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 10
"""Objects and arrays nested in ``metadata``, ``metadata`` itself being level 1."""
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_STRING_CHARS = 8000
"""A metadata string may be as long as an ``intent`` (``Text``), no longer."""
MAX_PROPERTIES_BYTES = 64 * 1024


class RequestModel(BaseModel):
    """Base of every request body: unknown keys and type coercion are rejected (400)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    """Base of every response model: exactly the contract's fields (G models forbid extras)."""

    model_config = ConfigDict(extra="forbid")


# --- schedules ----------------------------------------------------------------


Priority = Literal["low", "normal", "high", "critical"]
OutsideWindow = Literal["skip", "defer"]
SupersedeKey = Annotated[str, Field(min_length=1, max_length=128), Clean]
TtlSeconds = Annotated[int, Field(ge=1, le=31_536_000)]


class FreshnessFields(RequestModel):
    """
    A source's delivery policy (every field optional; absent keeps today's behaviour):
    ``priority`` against the attention budget, ``ttl_seconds`` / ``expires_at`` (the
    message's deadline), ``supersede_key`` (a newer message with the key replaces the
    user's pending one).
    """

    priority: Priority | None = None
    ttl_seconds: TtlSeconds | None = None
    expires_at: str | None = None
    supersede_key: SupersedeKey | None = None


class WindowFields(FreshnessFields):
    """Also ``outside_window``: inside the user's quiet hours, ``skip`` or ``defer``."""

    outside_window: OutsideWindow | None = None


class ScheduleCreate(WindowFields):
    """``POST …/schedules``."""

    cadence: dict[str, Any]
    intent: Text
    check_type: Label
    active_window: dict[str, Any] | None = None
    inventory_item_id: Ident | None = None
    metadata: dict[str, Any] | None = None
    starts_at: str | None = None
    ends_at: str | None = None


class SchedulePatch(WindowFields):
    """
    ``PATCH …/schedules/{id}``: absent is unchanged, ``{}`` clears ``active_window`` /
    ``metadata``, ``""`` clears ``starts_at`` / ``ends_at``; the delivery-policy fields
    (validated as at creation) are cleared by ``null`` and apply to the fires after
    the change.
    """

    cadence: dict[str, Any] | None = None
    intent: Text | None = None
    check_type: Label | None = None
    active_window: dict[str, Any] | None = None
    inventory_item_id: Annotated[str, Field(pattern=r"^([A-Za-z0-9._:@+-]{1,128})?$")] | None = None
    metadata: dict[str, Any] | None = None
    starts_at: str | None = None
    ends_at: str | None = None
    enabled: bool | None = None


class ScheduleCreated(ResponseModel):
    schedule_id: str
    next_fire_at: str
    next_fire_at_local: str
    enabled: bool


class ScheduleOut(ResponseModel):
    """The schedule object; structured fields are JSON text."""

    schedule_id: str
    cadence_type: str
    cadence: str
    timezone: str
    next_fire_at: str
    intent: str
    check_type: str
    enabled: bool
    created_at: str
    updated_at: str
    active_window: str | None = None
    metadata: str | None = None
    inventory_item_id: str | None = None
    starts_at: str | None = None
    ends_at: str | None = None


class ScheduleList(ResponseModel):
    schedules: list[ScheduleOut]


class Upcoming(ResponseModel):
    upcoming: list[str]


class Success(ResponseModel):
    success: bool


# --- wakeups ------------------------------------------------------------------


class WakeupCreate(WindowFields):
    """``POST /api/v1/agents/{agentId}/wakeups``; ``scheduled_at`` wins."""

    user_id: Ident
    check_type: Label
    intent: Text
    delay_hours: Annotated[int, Field(ge=0, le=87_600)] | None = None
    scheduled_at: str | None = None
    occasion: OptionalText | None = None
    interest_topic: OptionalText | None = None
    event_description: OptionalText | None = None
    inventory_item_id: Ident | None = None


class WakeupCreated(ResponseModel):
    wakeup_id: str
    scheduled_at: str


class WakeupOut(ResponseModel):
    wakeup_id: str
    agent_id: str
    user_id: str
    check_type: str
    status: str
    scheduled_at: str
    created_at: str
    executed_at: str | None = None
    intent: str | None = None
    occasion: str | None = None
    interest_topic: str | None = None
    event_description: str | None = None


class WakeupList(ResponseModel):
    wakeups: list[WakeupOut]


class WakeupCancelled(ResponseModel):
    wakeup_id: str
    status: str


# --- trigger events -----------------------------------------------------------


class ChatMessage(RequestModel):
    role: Annotated[str, Field(min_length=1, max_length=32), Clean]
    content: Annotated[str, Field(max_length=32_000), Clean]


class EventCreate(FreshnessFields):
    """``POST /api/v1/agents/{agentId}/events``; metadata is string-only."""

    user_id: Ident
    event_type: Label
    event_description: OptionalText | None = None
    metadata: dict[str, str] | None = None
    language: Annotated[str, Field(min_length=1, max_length=16), Clean] | None = None
    instance_id: Annotated[str, Field(max_length=128), Clean] | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=200)] | None = None


class EventAccepted(ResponseModel):
    accepted: bool
    event_id: str


class EventOut(ResponseModel):
    event_id: str
    agent_id: str
    user_id: str
    event_type: str
    status: str
    created_at: str
    metadata: dict[str, str]
    event_description: str | None = None


class EventList(ResponseModel):
    events: list[EventOut]


# --- inventory ----------------------------------------------------------------


class InventoryCreate(RequestModel):
    """``POST …/inventory/items``. ``project_id`` is accepted and ignored:
    the API key decides the project."""

    item_type: Label
    description: OptionalText | None = None
    label: Annotated[str, Field(max_length=512), Clean] | None = None
    kb_node_id: Annotated[str, Field(max_length=128), Clean] | None = None
    properties: dict[str, Any] | None = None
    project_id: Annotated[str, Field(max_length=128), Clean] | None = None


class InventoryWrite(InventoryCreate):
    """``POST …/inventory``: add, or update / remove the one item the fields identify."""

    action: Literal["add", "update", "remove"]


class InventoryDirectUpdate(RequestModel):
    properties: dict[str, Any]


class InventoryWriteOut(ResponseModel):
    status: str
    inventory_item_id: str
    fact_id: str


class InventoryDirectOut(ResponseModel):
    status: str
    fact_id: str


class InventoryItemOut(ResponseModel):
    inventory_item_id: str
    fact_id: str
    item_type: str
    properties: dict[str, Any]
    created_at: str
    updated_at: str
    label: str | None = None
    description: str | None = None
    kb_node_id: str | None = None


# --- notifications ------------------------------------------------------------


class NotificationOut(ResponseModel):
    """An agent-queue entry: exactly the SDK model's fields."""

    message_id: str
    agent_id: str
    user_id: str
    check_type: str
    generated_message: str
    status: str
    created_at: str
    consumed_at: str | None = None
    wakeup_id: str | None = None
    intent: str | None = None


class NotificationList(ResponseModel):
    notifications: list[NotificationOut]


class InboxEntryOut(NotificationOut):
    """
    A queue entry with its inbox instants: what the inbox routes answer, and what
    the list sends with ``include=inbox`` (the SDK's own model has no such fields).
    """

    seen_at: str | None = None
    read_at: str | None = None
    archived_at: str | None = None


class InboxBulk(RequestModel):
    """
    ``POST …/notifications/inbox``: one action over the listed messages, or over
    every message of ``user_id``; exactly one of the two.
    """

    action: Literal["seen", "read", "unread", "archive", "unarchive"]
    message_ids: (
        Annotated[
            list[Annotated[str, Field(pattern=ID_PATTERN)]], Field(min_length=1, max_length=1000)
        ]
        | None
    ) = None
    user_id: Ident | None = None


class InboxUpdated(ResponseModel):
    """How many messages the action changed (those already in that state are not counted)."""

    updated: int


class InboxCountsOut(ResponseModel):
    """Badge counts; every count but ``total`` and ``archived`` leaves archived messages out."""

    total: int
    unseen: int
    unread: int
    archived: int
    pending: int


class ProjectNotificationOut(ResponseModel):
    notification_id: str
    project_id: str
    event_type: str
    status: str
    payload: Any
    created_at: str
    agent_id: str | None = None
    user_id: str | None = None
    acknowledged_at: str | None = None


class ProjectNotificationList(ResponseModel):
    notifications: list[ProjectNotificationOut]
    count: int


class AcknowledgeBody(RequestModel):
    notification_ids: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=1000)]


class Acknowledged(ResponseModel):
    acknowledged: int


# --- service ------------------------------------------------------------------


class Health(ResponseModel):
    status: str
    database: str
    tzdata: str
