"""
Core tables. Instants are :class:`UTCDateTime` (aware UTC); structured values are
canonical JSON text (sorted keys, compact) so both databases store the same bytes
and the API can echo them verbatim.

Ids are prefixed strings (``sch_``, ``wk_``, ``evt_``, ``fire_``, ``msg_``, ...)
so an id names its kind in logs. Every tenant-owned row carries ``project_id``
and every query filters on it, so tenants never see each other's rows.
"""

from datetime import datetime

from sqlalchemy import Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from delivery.store.types import UTCDateTime


class ProjectRow(SQLModel, table=True):
    __tablename__ = "projects"

    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=128, unique=True)
    created_at: datetime = Field(sa_type=UTCDateTime)


class ApiKeyRow(SQLModel, table=True):
    """An API key, stored as the SHA-256 of the key; the key itself is printed once."""

    __tablename__ = "api_keys"

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", index=True, max_length=64)
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16, description="First characters, to tell keys apart.")
    created_at: datetime = Field(sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class ScheduleRow(SQLModel, table=True):
    """
    A recurring schedule. ``next_fire_at`` is NULL when disabled or exhausted.

    The scheduler claims rows with ``enabled AND next_fire_at <= now AND
    (claimed_until IS NULL OR claimed_until < now)`` through ``ix_schedules_due``;
    the rows of an advanced (agent, user) pair, whose instants are on the pair's
    simulated clock, carry ``due_at`` (``next_fire_at`` minus the pair's offset,
    in real time) and are claimed by it through ``ix_schedules_shifted``.
    ``version`` increments on every write so an API PATCH racing a scheduler
    tick is detected instead of silently overwritten.
    """

    __tablename__ = "schedules"
    __table_args__ = (
        Index("ix_schedules_due", "enabled", "next_fire_at"),
        Index("ix_schedules_shifted", "enabled", "due_at"),
        Index("ix_schedules_owner", "project_id", "agent_id", "user_id"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    cadence_type: str = Field(max_length=16)
    cadence_json: str = Field(sa_type=Text)
    timezone: str = Field(max_length=64)
    active_window_json: str | None = Field(default=None, sa_type=Text)
    intent: str = Field(sa_type=Text)
    check_type: str = Field(max_length=128)
    inventory_item_id: str | None = Field(default=None, max_length=128)
    metadata_json: str | None = Field(default=None, sa_type=Text)
    starts_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    ends_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    anchor_at: datetime = Field(sa_type=UTCDateTime, description="interval_hours anchor")
    enabled: bool = True
    next_fire_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    due_at: datetime | None = Field(
        default=None,
        sa_type=UTCDateTime,
        description="real instant next_fire_at is due at, set only on an advanced pair's rows",
    )
    last_fire_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    staged_fire_at: datetime | None = Field(
        default=None,
        sa_type=UTCDateTime,
        description="a fire planned ahead of its instant (scheduler lookahead), not yet due",
    )
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    version: int = 1
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    policy_json: str | None = Field(
        default=None, sa_type=Text, description="the source's delivery policy (delivery.policy)"
    )


class ScheduleChangeRow(SQLModel, table=True):
    """
    One change of a schedule: append-only history for the timeline.

    Written in the transaction of the schedule write it records (create, PATCH,
    delete), so a change is recorded exactly when it happened. ``kind`` is
    ``created | updated | disabled | enabled | deleted``; ``fields_json`` lists the
    fields the write set; ``timezone`` is the schedule's zone after it.
    The scheduler's own disable when ``ends_at`` passes is not a row here: the
    timeline shows it from ``schedules.ends_at``.
    """

    __tablename__ = "schedule_changes"
    __table_args__ = (
        Index("ix_schedule_changes_owner", "project_id", "agent_id", "user_id", "changed_at"),
        Index("ix_schedule_changes_schedule", "schedule_id", "changed_at"),
        Index("ix_schedule_changes_changed_at", "changed_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    schedule_id: str = Field(max_length=64)
    project_id: str = Field(max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    kind: str = Field(max_length=16)
    fields_json: str = Field(default="[]", sa_type=Text)
    timezone: str = Field(max_length=64)
    version: int
    changed_at: datetime = Field(sa_type=UTCDateTime)


class FireRow(SQLModel, table=True):
    """
    One cadence tick of a schedule: produced (``status='fired'``) or skipped with a reason.

    Unique on (schedule_id, fire_at), so a tick fires at most once. ``id`` is derived
    from that pair, so replays and advance-time produce the same id.
    """

    __tablename__ = "fires"
    __table_args__ = (
        UniqueConstraint("schedule_id", "fire_at", name="uq_fires_schedule_fire_at"),
        Index("ix_fires_owner", "project_id", "agent_id", "user_id", "fire_at"),
        # Retention prunes the oldest fires in batches, across every tenant.
        Index("ix_fires_fire_at", "fire_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    schedule_id: str = Field(max_length=64)
    project_id: str = Field(max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    fire_at: datetime = Field(sa_type=UTCDateTime)
    status: str = Field(max_length=16, description="fired | skipped")
    skip_reason: str | None = Field(default=None, max_length=64)
    created_at: datetime = Field(sa_type=UTCDateTime)


class WakeupRow(SQLModel, table=True):
    """
    A one-off fire: pending -> executed | cancelled; executed and cancelled are final.

    ``scheduled_at`` is on the pair's clock; on an advanced pair ``due_at`` is that
    instant in real time (``scheduled_at`` minus the offset), which the scheduler
    claims by instead (``ix_wakeups_shifted``).
    """

    __tablename__ = "wakeups"
    __table_args__ = (
        Index("ix_wakeups_due", "status", "scheduled_at"),
        Index("ix_wakeups_shifted", "status", "due_at"),
        Index("ix_wakeups_owner", "project_id", "agent_id", "user_id"),
        Index("ix_wakeups_timeline", "project_id", "agent_id", "user_id", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    check_type: str = Field(max_length=128)
    intent: str = Field(sa_type=Text)
    occasion: str | None = Field(default=None, sa_type=Text)
    interest_topic: str | None = Field(default=None, sa_type=Text)
    event_description: str | None = Field(default=None, sa_type=Text)
    inventory_item_id: str | None = Field(default=None, max_length=128)
    scheduled_at: datetime = Field(sa_type=UTCDateTime)
    due_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    status: str = Field(default="pending", max_length=16)
    executed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    cancelled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    policy_json: str | None = Field(default=None, sa_type=Text)


class TriggerEventRow(SQLModel, table=True):
    """A backend trigger event, accepted and awaiting (or past) its reaction."""

    __tablename__ = "trigger_events"
    __table_args__ = (
        Index("ix_trigger_events_owner", "project_id", "agent_id", "created_at"),
        Index("ix_trigger_events_timeline", "project_id", "agent_id", "user_id", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    event_type: str = Field(max_length=128)
    event_description: str | None = Field(default=None, sa_type=Text)
    metadata_json: str | None = Field(default=None, sa_type=Text)
    messages_json: str | None = Field(default=None, sa_type=Text)
    language: str = Field(default="en", max_length=16)
    instance_id: str | None = Field(default=None, max_length=128)
    status: str = Field(default="accepted", max_length=16, description="accepted | dispatched")
    created_at: datetime = Field(sa_type=UTCDateTime)
    policy_json: str | None = Field(default=None, sa_type=Text)


class InventoryItemRow(SQLModel, table=True):
    """A structured user fact (e.g. a medication) a schedule reads live at each fire."""

    __tablename__ = "inventory_items"
    __table_args__ = (Index("ix_inventory_owner", "project_id", "agent_id", "user_id"),)

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    item_type: str = Field(max_length=128)
    label: str | None = Field(default=None, sa_type=Text)
    description: str | None = Field(default=None, sa_type=Text)
    kb_node_id: str | None = Field(default=None, max_length=128)
    properties_json: str = Field(default="{}", sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


SETTLED_PREDICATE = "status IN ('suppressed', 'superseded', 'expired', 'system')"
"""Notifications in a final state other than ``consumed``: never delivered, never
changed again (spelt once: the partial index and retention's query must match)."""


class NotificationRow(SQLModel, table=True):
    """
    One proactive message: the polling queue entry and the project notification at once.

    Unique on ``source_id`` (a fire id, wakeup id or event id; the prefixes keep
    them disjoint): a redelivered NATS message or a
    restarted process never makes a second one. ``status`` is the agent queue's
    (pending | consumed | expired | failed_generation, and the policies'
    suppressed | superseded with a ``status_reason``), or ``staged``: composed
    during the scheduler's lookahead, hidden from every read until the relay
    promotes it at its fire instant (:mod:`delivery.store.staging`). ``ack_status`` is the
    project view's (pending | acknowledged). ``payload_json`` is the
    message payload, the same bytes the webhook sends.

    ``seen_at``, ``read_at`` and ``archived_at`` are the inbox states, three
    independent flags kept as the instant each was set (``None``: not set), beside
    ``status``: a consumed message can be unread, an archived one unseen. Marking
    read also marks seen; unarchiving clears ``archived_at`` (``delivery.store.
    notifications.InboxAction``).
    """

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("source_id", name="uq_notifications_source"),
        Index("ix_notifications_queue", "project_id", "agent_id", "status", "created_at"),
        Index("ix_notifications_user", "project_id", "agent_id", "user_id", "status", "created_at"),
        Index("ix_notifications_project", "project_id", "ack_status", "created_at"),
        # Webhook recovery: an event type's messages since an instant.
        Index("ix_notifications_event_type", "project_id", "event_type", "created_at"),
        # The timeline reads one user's messages by instant, whatever their status,
        # and their consumptions by when they happened (and retention by that too).
        Index("ix_notifications_timeline", "project_id", "agent_id", "user_id", "created_at"),
        Index(
            "ix_notifications_consumed",
            "project_id",
            "agent_id",
            "user_id",
            "consumed_at",
            sqlite_where=text("consumed_at IS NOT NULL"),
            postgresql_where=text("consumed_at IS NOT NULL"),
        ),
        Index(
            "ix_notifications_consumed_at",
            "consumed_at",
            sqlite_where=text("consumed_at IS NOT NULL"),
            postgresql_where=text("consumed_at IS NOT NULL"),
        ),
        # Only composed-ahead rows are in it, and they leave it when promoted, so
        # the relay's "anything due to promote?" probe stays a tiny index lookup.
        # The attention budget counts one user's recent messages across agents.
        Index("ix_notifications_attention", "project_id", "user_id", "created_at"),
        # The expiry sweep finds live (pending or staged) rows past their deadline.
        Index(
            "ix_notifications_expiring",
            "expires_at",
            sqlite_where=text("expires_at IS NOT NULL AND status IN ('pending', 'staged')"),
            postgresql_where=text("expires_at IS NOT NULL AND status IN ('pending', 'staged')"),
        ),
        # A supersede_key replaces the user's pending message with the same key.
        Index(
            "ix_notifications_supersede",
            "project_id",
            "user_id",
            "supersede_key",
            sqlite_where=text("supersede_key IS NOT NULL"),
            postgresql_where=text("supersede_key IS NOT NULL"),
        ),
        # Retention finds old messages that can never be delivered (a policy held
        # them back, or the service wrote them about itself) by when they were made.
        Index(
            "ix_notifications_settled",
            "created_at",
            sqlite_where=text(SETTLED_PREDICATE),
            postgresql_where=text(SETTLED_PREDICATE),
        ),
        Index(
            "ix_notifications_staged",
            "fire_at",
            sqlite_where=text("status = 'staged'"),
            postgresql_where=text("status = 'staged'"),
        ),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    source_type: str = Field(max_length=16, description="schedule | wakeup | event")
    source_id: str = Field(max_length=64)
    schedule_id: str | None = Field(default=None, max_length=64)
    wakeup_id: str | None = Field(default=None, max_length=64)
    trigger_event_id: str | None = Field(default=None, max_length=64)
    event_type: str = Field(max_length=64, description="on_recurring_event_due | ...")
    check_type: str = Field(max_length=128)
    intent: str = Field(default="", sa_type=Text)
    generated_message: str = Field(default="", sa_type=Text)
    status: str = Field(default="pending", max_length=24)
    error: str | None = Field(default=None, sa_type=Text)
    composer: str | None = Field(
        default=None,
        max_length=24,
        description="template | default | llm | template_fallback | default_fallback",
    )
    fire_at: datetime = Field(sa_type=UTCDateTime)
    payload_json: str = Field(default="{}", sa_type=Text)
    ack_status: str = Field(default="pending", max_length=16)
    acknowledged_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    consumed_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    read_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    archived_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    priority: str | None = Field(default=None, max_length=16)
    expires_at: datetime | None = Field(
        default=None, sa_type=UTCDateTime, description="never sent after; expired when passed"
    )
    supersede_key: str | None = Field(default=None, max_length=128)
    status_reason: str | None = Field(
        default=None, max_length=64, description="why a policy set the status (delivery.policy)"
    )


class IdempotencyRow(SQLModel, table=True):
    """The first response to an ``Idempotency-Key``, replayed for 24 h."""

    __tablename__ = "idempotency_records"

    project_id: str = Field(primary_key=True, max_length=64)
    route: str = Field(primary_key=True, max_length=512, description="METHOD + path")
    key: str = Field(primary_key=True, max_length=255)
    request_hash: str = Field(max_length=64)
    status_code: int
    response_body: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime, index=True)


class ClockOffsetRow(SQLModel, table=True):
    """Advance-time's per (agent, user) simulated offset; absent = 0."""

    __tablename__ = "clock_offsets"

    project_id: str = Field(primary_key=True, max_length=64)
    agent_id: str = Field(primary_key=True, max_length=128)
    user_id: str = Field(primary_key=True, max_length=128)
    offset_s: float = 0.0
    updated_at: datetime = Field(sa_type=UTCDateTime)


class DeploymentFactRow(SQLModel, table=True):
    """A named value the parts of one deployment share (see ``delivery.store.facts``)."""

    __tablename__ = "deployment_facts"

    name: str = Field(primary_key=True, max_length=64)
    value: str = Field(sa_type=Text)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class OutboxRow(SQLModel, table=True):
    """
    A NATS message committed with the state change that caused it.

    The relay publishes unsent rows whose ``available_at`` has passed, in
    (available_at, id) order, with ``msg_id`` as ``Nats-Msg-Id`` (JetStream
    dedupes repeats) and then stamps ``sent_at``; publishing twice is harmless.
    ``available_at`` is later than ``created_at`` only for a fire the scheduler
    planned ahead of its instant (lookahead).
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unsent", "sent_at", "available_at", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    subject: str = Field(max_length=255)
    msg_id: str = Field(max_length=128, unique=True)
    payload: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    available_at: datetime = Field(sa_type=UTCDateTime)
    sent_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    headers: str | None = Field(default=None, sa_type=Text)
    """JSON object of NATS headers to send besides ``Nats-Msg-Id`` (request id, trace)."""


class AdvanceTimeJobRow(SQLModel, table=True):
    """An ``advance-time`` run (sync or ``run_async``); polled for 30 minutes."""

    __tablename__ = "advance_time_jobs"

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    status: str = Field(max_length=16, description="running | succeeded | failed")
    result_json: str | None = Field(default=None, sa_type=Text)
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    simulated_hours: float | None = Field(
        default=None, description="the call's window, so a job cut short by a restart reruns"
    )
    lease_owner: str | None = Field(default=None, max_length=64)
    lease_until: datetime | None = Field(default=None, sa_type=UTCDateTime)
