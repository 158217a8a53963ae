"""
Delivery policy: a project's rules, a user's quiet hours, and the per-user row the
attention budget is decided under.

``delivery_policies`` holds one JSON policy per project (absent: every rule off).
``user_quiet_hours`` is keyed by (project, user), not by agent: quiet hours are the
person's, and every agent of the project that reaches them must keep them, as the
attention budget counts every source of the project for that person.
``attention_counters`` holds one row per (project, user) that has had a message
under a budget; the dispatcher locks it (``INSERT ... ON CONFLICT DO UPDATE``, a
row lock on PostgreSQL) in the transaction that counts the user's recent messages
and writes the new ones, so two dispatchers never both spend the last unit.
"""

from datetime import datetime

from sqlalchemy import Text
from sqlmodel import Field, SQLModel

from delivery.store.types import UTCDateTime


class DeliveryPolicyRow(SQLModel, table=True):
    """A project's delivery policy (:class:`delivery.policy.ProjectPolicy` as JSON)."""

    __tablename__ = "delivery_policies"

    project_id: str = Field(primary_key=True, foreign_key="projects.id", max_length=64)
    policy_json: str = Field(sa_type=Text)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class UserQuietHoursRow(SQLModel, table=True):
    """One user's quiet hours in their zone, across every agent of the project."""

    __tablename__ = "user_quiet_hours"

    project_id: str = Field(primary_key=True, foreign_key="projects.id", max_length=64)
    user_id: str = Field(primary_key=True, max_length=128)
    timezone: str = Field(max_length=64)
    start_minute: int
    end_minute: int
    updated_at: datetime = Field(sa_type=UTCDateTime)


class AttentionCounterRow(SQLModel, table=True):
    """The row a user's budget decisions lock; ``touched_at`` is the last decision."""

    __tablename__ = "attention_counters"

    project_id: str = Field(primary_key=True, max_length=64)
    user_id: str = Field(primary_key=True, max_length=128)
    touched_at: datetime = Field(sa_type=UTCDateTime)
