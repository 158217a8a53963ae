"""
Webhook tables: endpoints, the durable delivery queue, and the attempts log.

Secrets and ``auth_header`` are stored encrypted (:mod:`delivery.secrets`); a
table row never holds one in clear. The delivery queue is the only
retry state there is: a restarted handlers process resumes from ``next_attempt_at``,
so nothing about a retry lives in memory.
"""

from datetime import datetime

from sqlalchemy import Index, Text, UniqueConstraint, false, text
from sqlmodel import Field, SQLModel

from delivery.store.types import UTCDateTime


class WebhookEndpointRow(SQLModel, table=True):
    """
    One registered URL per (project, event type); registering again upserts.

    ``secret_enc`` is the current ``whsec_`` secret, encrypted. After a rotation
    ``previous_secret_enc`` keeps the old one and both sign until ``rotated_at`` + 24 h
    (``handlers.webhooks.signing.active_secrets``). ``is_active`` turns false when a
    receiver answers 410 Gone, or when it has failed continuously for
    ``DELIVERY_WEBHOOK_DISABLE_AFTER_S``; ``disabled_reason`` says why and
    ``disabled_at`` when, and registering again (or the enable route) re-enables the
    endpoint. ``failing_since`` is the first failed attempt of the current streak
    (cleared by any 2xx): the endpoint has had no success since then.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        UniqueConstraint("project_id", "event_type", name="uq_webhook_endpoints_scope"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    event_type: str = Field(max_length=128)
    url: str = Field(sa_type=Text)
    secret_enc: str = Field(sa_type=Text)
    previous_secret_enc: str | None = Field(default=None, sa_type=Text)
    rotated_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    auth_header_enc: str | None = Field(default=None, sa_type=Text)
    is_active: bool = True
    disabled_reason: str | None = Field(default=None, sa_type=Text)
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    failing_since: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class WebhookDeliveryRow(SQLModel, table=True):
    """
    The durable retry queue: one row per (notification, endpoint), never two.

    ``status``: ``pending`` (due at ``next_attempt_at``), ``delivered`` (a 2xx),
    ``dead`` (the last attempt failed, a permanent failure, or the endpoint went
    away), ``skipped`` (the notification was consumed by polling first,
    so it is not sent). A re-send (:meth:`delivery.store.webhooks.WebhookStore.resend`,
    ``recover``) makes a finished row ``pending`` again: ``round_start`` keeps the
    attempt count the new round began at (the retry schedule restarts from it while
    attempt numbers keep rising) and ``force_send`` sends a consumed message anyway.
    While a worker sends, ``claimed_by`` names it and
    ``next_attempt_at`` holds the lease's end, so a killed worker's row becomes due
    again by itself. ``event_id`` is the notification id, sent as ``webhook-id`` on
    every attempt (the receiver's dedupe key).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint(
            "notification_id", "endpoint_id", name="uq_webhook_deliveries_notification_endpoint"
        ),
        # endpoint_id last: the claim leaves out endpoints at their cap from the index
        # entries, without reading the rows it passes over.
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at", "endpoint_id"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "status"),
        # The pending rows only, by endpoint then due time: PostgreSQL's claim finds
        # the endpoints with pending rows by a skip scan of it (one descent each),
        # then reads each one's due rows in order from this index or the due one
        # (the planner's choice; both check the endpoint on the index entries, where
        # the NOT IN filter above was checked on each table row).
        Index(
            "ix_webhook_deliveries_pending",
            "endpoint_id",
            "next_attempt_at",
            postgresql_where=text("status = 'pending'"),
            sqlite_where=text("status = 'pending'"),
        ),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(max_length=64)
    endpoint_id: str = Field(max_length=64)
    notification_id: str = Field(max_length=64)
    event_id: str = Field(max_length=64)
    event_type: str = Field(max_length=128)
    status: str = Field(default="pending", max_length=16)
    attempt_count: int = 0
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    claimed_by: str | None = Field(default=None, max_length=64)
    last_error: str | None = Field(default=None, sa_type=Text)
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    round_start: int = Field(
        default=0,
        sa_column_kwargs={"server_default": text("0")},
        description="attempt_count when the current round (a re-send) began",
    )
    force_send: bool = Field(
        default=False,
        sa_column_kwargs={"server_default": false()},
        description="send even though the notification was consumed",
    )


class WebhookAttemptRow(SQLModel, table=True):
    """
    One delivery attempt, as the attempts endpoint shows it.

    ``seq`` orders attempts and is the page cursor; ``id`` is the wire ``attempt_id``.
    Rows outlive their endpoint and delivery: a dead letter stays visible.
    ``agent_id`` and ``user_id`` copy the notification's, so one user's attempts are
    an index range (the timeline); rows from before they existed have them backfilled.
    """

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        Index("ix_webhook_attempts_scope", "project_id", "event_type", "seq"),
        Index("ix_webhook_attempts_owner", "project_id", "agent_id", "user_id", "created_at"),
    )

    seq: int | None = Field(default=None, primary_key=True)
    id: str = Field(max_length=64, unique=True)
    delivery_id: str = Field(max_length=64, index=True)
    project_id: str = Field(max_length=64)
    event_type: str = Field(max_length=128)
    event_id: str = Field(max_length=64)
    agent_id: str | None = Field(
        default=None, max_length=128, description="the notification's, for the user timeline"
    )
    user_id: str | None = Field(default=None, max_length=128)
    attempt_number: int
    webhook_url: str = Field(sa_type=Text)
    status: str = Field(max_length=16, description="success | failed")
    response_code: int = 0
    duration_ms: int = 0
    request_body: str | None = Field(default=None, sa_type=Text)
    response_body: str | None = Field(default=None, sa_type=Text)
    error_message: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
