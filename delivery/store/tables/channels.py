"""
Channel tables (push, email, SMS): per-user contacts and channel
preferences, the project's SDK-visible notification channels, and one row per
channel send attempt (which doubles as the durable retry queue).

Every row carries ``project_id`` and every query filters on it.
"""

from datetime import datetime

from sqlalchemy import Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from delivery.store.types import UTCDateTime


class ContactRow(SQLModel, table=True):
    """
    One destination of one (project, agent, user): an FCM token, an email address or
    an E.164 number, normalised by ``handlers.contacts``.

    The destination is personal data (or, for a token, a credential to push to a
    device), so it is stored sealed only: ``destination_enc`` is its Fernet ciphertext
    (``delivery.secrets.SecretBox``). Unique on (project, agent, user, kind,
    ``destination_hash``): the hash is the box's keyed digest (HMAC-SHA256 hex) of
    the owner, kind and normalised destination (``delivery.store.channels.
    contact_digest``), so adding the same destination again finds its row, while
    the digest of a guessed number cannot be computed without the key, and equal
    destinations of two users do not share a digest. It also keeps the index entry
    small (an FCM token may be 4 KiB, above what a PostgreSQL btree entry holds).
    ``opted_out`` is the user's word (kept so they can opt back in); ``disabled`` is
    the provider's (a dead token or an unsubscribed number), set by the channels worker.
    """

    __tablename__ = "contacts"
    __table_args__ = (
        UniqueConstraint(
            "project_id",
            "agent_id",
            "user_id",
            "kind",
            "destination_hash",
            name="uq_contacts_destination",
        ),
        Index("ix_contacts_owner", "project_id", "agent_id", "user_id"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    kind: str = Field(max_length=8, description="fcm | email | sms")
    destination_enc: str = Field(sa_type=Text)
    destination_hash: str = Field(max_length=64)
    opted_out: bool = False
    disabled: bool = False
    disabled_reason: str | None = Field(default=None, sa_type=Text)
    disabled_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class ChannelPreferenceRow(SQLModel, table=True):
    """
    A user's channel preferences: canonical JSON ``{check_type or "*": [kind, ...]}``
    (``handlers.contacts.validate_preferences``); no row means "every channel".
    """

    __tablename__ = "channel_preferences"

    project_id: str = Field(primary_key=True, foreign_key="projects.id", max_length=64)
    agent_id: str = Field(primary_key=True, max_length=128)
    user_id: str = Field(primary_key=True, max_length=128)
    preferences_json: str = Field(default="{}", sa_type=Text)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class NotificationChannelRow(SQLModel, table=True):
    """
    A project's notification channel: ``webhook`` or ``email``.

    ``config_json`` holds the non-secret config keys; the secret ones (``api_key``,
    ``secret``, ...) live only in ``secrets_enc``, AES-GCM encrypted
    (``delivery.store.channels.ConfigSealer``), and are masked on every read.
    """

    __tablename__ = "notification_channels"
    __table_args__ = (Index("ix_notification_channels_project", "project_id", "created_at"),)

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    name: str = Field(max_length=128)
    type: str = Field(max_length=16, description="webhook | email")
    config_json: str = Field(default="{}", sa_type=Text)
    secrets_enc: str | None = Field(default=None, sa_type=Text)
    events_json: str = Field(default="[]", sa_type=Text)
    filter_json: str | None = Field(default=None, sa_type=Text)
    active: bool = True
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class ChannelAttemptRow(SQLModel, table=True):
    """
    One send attempt of one notification to one (channel kind, destination), or to
    one project notification channel (``channel_id`` set, ``kind`` the channel's
    type ``webhook`` | ``email``; ``notification_id`` is the event's id for a
    ``deliver`` call, which has no notification).

    ``status`` is ``sent | failed | skipped`` (the wire values). A transient failure
    sets ``next_attempt_at``: the row is then the durable retry queue entry, claimed
    by the worker (``ix_channel_attempts_due``), and cleared in the transaction that
    records the next attempt. ``destination`` is stored redacted
    (``handlers.contacts.redact``); ``contact_id`` names the full one.
    """

    __tablename__ = "channel_attempts"
    __table_args__ = (
        Index("ix_channel_attempts_due", "next_attempt_at"),
        Index("ix_channel_attempts_notification", "notification_id", "created_at"),
        Index("ix_channel_attempts_owner", "project_id", "agent_id", "user_id", "created_at"),
        Index("ix_channel_attempts_created_at", "created_at"),
        Index("ix_channel_attempts_channel", "channel_id", "created_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    notification_id: str = Field(max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    kind: str = Field(max_length=8, description="fcm | email | sms | webhook")
    contact_id: str | None = Field(default=None, max_length=64)
    channel_id: str | None = Field(
        default=None, max_length=64, description="the project channel attempted, if one was"
    )
    destination: str = Field(max_length=255, description="redacted")
    status: str = Field(max_length=16, description="sent | failed | skipped")
    reason: str = Field(default="", sa_type=Text)
    response_code: int = 0
    duration_ms: int = 0
    attempt_number: int = 1
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)


class ChannelFallbackRow(SQLModel, table=True):
    """
    One message's channel fallback (``DELIVERY_CHANNEL_FALLBACK_AFTER_S``): the
    channels to try in order, the one being tried, and every decision taken.

    ``order_json`` lists the channel kinds; ``step`` indexes the current one and
    ``attempt_number`` numbers its next send. ``step_deadline`` ends its time.
    ``next_attempt_at`` is when the row is due (a retry of the current channel,
    or its deadline); ``None`` once finished (``status`` ``delivered``,
    ``exhausted`` or ``stopped``). A worker claims a due row by setting
    ``claim`` (its token) and moving ``next_attempt_at`` to the lease's end;
    ``sending`` is written before a send and cleared with its result, so a
    worker killed in between is replaced by one that repeats the same channel.
    ``decisions_json`` is the list of decisions (``handlers.fallback.Decision``).
    """

    __tablename__ = "channel_fallbacks"
    __table_args__ = (
        Index("ix_channel_fallbacks_due", "next_attempt_at"),
        Index("ix_channel_fallbacks_updated_at", "updated_at"),
        # The user timeline reads a user's rows by their latest decision.
        Index("ix_channel_fallbacks_owner", "project_id", "agent_id", "user_id", "updated_at"),
    )

    notification_id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    agent_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    order_json: str = Field(sa_type=Text)
    step: int = 0
    attempt_number: int = 1
    step_deadline: datetime = Field(sa_type=UTCDateTime)
    next_attempt_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    claim: str | None = Field(default=None, max_length=64)
    sending: bool = False
    status: str = Field(max_length=16, description="active | delivered | exhausted | stopped")
    decisions_json: str = Field(default="[]", sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
