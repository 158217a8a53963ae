"""
Every table, as SQLModel classes on one shared ``SQLModel.metadata``.

Split by concept: :mod:`.core` (projects, keys, schedules, fires, wakeups,
events, inventory, notifications, idempotency, clock offsets, outbox, jobs);
webhook and channel tables live in their own modules as their issues add them.
Alembic's ``target_metadata`` is :data:`metadata` below, so a table module must
be imported here to exist.
"""

from sqlmodel import SQLModel

import delivery.store.tables.channels  # registers the channel tables
import delivery.store.tables.webhooks  # noqa: F401 - registers the webhook tables
from delivery.store.tables.core import (
    AdvanceTimeJobRow,
    ApiKeyRow,
    ClockOffsetRow,
    FireRow,
    IdempotencyRow,
    InventoryItemRow,
    NotificationRow,
    OutboxRow,
    ProjectRow,
    ScheduleRow,
    TriggerEventRow,
    WakeupRow,
)

metadata = SQLModel.metadata

__all__ = [
    "AdvanceTimeJobRow",
    "ApiKeyRow",
    "ClockOffsetRow",
    "FireRow",
    "IdempotencyRow",
    "InventoryItemRow",
    "NotificationRow",
    "OutboxRow",
    "ProjectRow",
    "ScheduleRow",
    "TriggerEventRow",
    "WakeupRow",
    "metadata",
]
