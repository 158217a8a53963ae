"""
Every table, as SQLModel classes on one shared ``SQLModel.metadata``.

Split by concept: :mod:`.core` (projects, keys, schedules, fires, wakeups,
events, inventory, notifications, idempotency, clock offsets, outbox, jobs);
webhook and channel tables live in their own modules as their issues add them.
Alembic's ``target_metadata`` is :data:`metadata` below, so a table module must
be imported here to exist.
"""

from sqlalchemy import Table
from sqlmodel import SQLModel

from delivery.store.tables.channels import (
    ChannelAttemptRow,
    ChannelFallbackRow,
    ChannelPreferenceRow,
    ContactRow,
    NotificationChannelRow,
)
from delivery.store.tables.core import (
    AdvanceTimeJobRow,
    ApiKeyRow,
    ClockOffsetRow,
    DeploymentFactRow,
    FireRow,
    IdempotencyRow,
    InventoryItemRow,
    NotificationRow,
    OutboxRow,
    ProjectRow,
    ScheduleChangeRow,
    ScheduleRow,
    TriggerEventRow,
    WakeupRow,
)
from delivery.store.tables.policy import (
    AttentionCounterRow,
    DeliveryPolicyRow,
    UserQuietHoursRow,
)
from delivery.store.tables.templates import MessageTemplateRow, MessageTemplateVersionRow
from delivery.store.tables.webhooks import WebhookAttemptRow, WebhookDeliveryRow, WebhookEndpointRow

metadata = SQLModel.metadata

# The Core tables behind the models, declared once for every store module (SQLModel's
# stubs do not declare ``__table__``, hence the one ignore per table).
CONTACTS: Table = ContactRow.__table__  # type: ignore[attr-defined]
PREFERENCES: Table = ChannelPreferenceRow.__table__  # type: ignore[attr-defined]
CHANNELS: Table = NotificationChannelRow.__table__  # type: ignore[attr-defined]
CHANNEL_ATTEMPTS: Table = ChannelAttemptRow.__table__  # type: ignore[attr-defined]
CHANNEL_FALLBACKS: Table = ChannelFallbackRow.__table__  # type: ignore[attr-defined]
PROJECTS: Table = ProjectRow.__table__  # type: ignore[attr-defined]
API_KEYS: Table = ApiKeyRow.__table__  # type: ignore[attr-defined]
SCHEDULES: Table = ScheduleRow.__table__  # type: ignore[attr-defined]
FIRES: Table = FireRow.__table__  # type: ignore[attr-defined]
SCHEDULE_CHANGES: Table = ScheduleChangeRow.__table__  # type: ignore[attr-defined]
WAKEUPS: Table = WakeupRow.__table__  # type: ignore[attr-defined]
EVENTS: Table = TriggerEventRow.__table__  # type: ignore[attr-defined]
INVENTORY: Table = InventoryItemRow.__table__  # type: ignore[attr-defined]
NOTIFICATIONS: Table = NotificationRow.__table__  # type: ignore[attr-defined]
IDEMPOTENCY: Table = IdempotencyRow.__table__  # type: ignore[attr-defined]
OFFSETS: Table = ClockOffsetRow.__table__  # type: ignore[attr-defined]
FACTS: Table = DeploymentFactRow.__table__  # type: ignore[attr-defined]
OUTBOX: Table = OutboxRow.__table__  # type: ignore[attr-defined]
JOBS: Table = AdvanceTimeJobRow.__table__  # type: ignore[attr-defined]
TEMPLATES: Table = MessageTemplateRow.__table__  # type: ignore[attr-defined]
TEMPLATE_VERSIONS: Table = MessageTemplateVersionRow.__table__  # type: ignore[attr-defined]
ENDPOINTS: Table = WebhookEndpointRow.__table__  # type: ignore[attr-defined]
DELIVERIES: Table = WebhookDeliveryRow.__table__  # type: ignore[attr-defined]
WEBHOOK_ATTEMPTS: Table = WebhookAttemptRow.__table__  # type: ignore[attr-defined]
POLICIES: Table = DeliveryPolicyRow.__table__  # type: ignore[attr-defined]
QUIET_HOURS: Table = UserQuietHoursRow.__table__  # type: ignore[attr-defined]
ATTENTION: Table = AttentionCounterRow.__table__  # type: ignore[attr-defined]

__all__ = [
    "API_KEYS",
    "ATTENTION",
    "CHANNELS",
    "CHANNEL_ATTEMPTS",
    "CHANNEL_FALLBACKS",
    "CONTACTS",
    "DELIVERIES",
    "ENDPOINTS",
    "EVENTS",
    "FACTS",
    "FIRES",
    "IDEMPOTENCY",
    "INVENTORY",
    "JOBS",
    "NOTIFICATIONS",
    "OFFSETS",
    "OUTBOX",
    "POLICIES",
    "PREFERENCES",
    "PROJECTS",
    "QUIET_HOURS",
    "SCHEDULES",
    "SCHEDULE_CHANGES",
    "TEMPLATES",
    "TEMPLATE_VERSIONS",
    "WAKEUPS",
    "WEBHOOK_ATTEMPTS",
    "AdvanceTimeJobRow",
    "ApiKeyRow",
    "ClockOffsetRow",
    "DeploymentFactRow",
    "FireRow",
    "IdempotencyRow",
    "InventoryItemRow",
    "MessageTemplateRow",
    "MessageTemplateVersionRow",
    "NotificationRow",
    "OutboxRow",
    "ProjectRow",
    "ScheduleChangeRow",
    "ScheduleRow",
    "TriggerEventRow",
    "WakeupRow",
    "metadata",
]
