"""timeline: schedule_changes, the owner of each webhook attempt, and time indexes

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04

"Why did this user not get a message?" is answered from the tables that record
each fact. Two facts were missing: a schedule's history (``schedule_changes``,
append-only, written in the transaction of the schedule write) and which user a
webhook attempt was for (``webhook_attempts.agent_id`` / ``user_id``, copied from
the notification and backfilled here). The new indexes let a user's timeline be
a range read per table, and let retention find the oldest rows without a scan.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import delivery.store.types


revision: str = '0010'
down_revision: str | Sequence[str] | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CONSUMED = "consumed_at IS NOT NULL"


def upgrade() -> None:
    op.create_table('schedule_changes',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('schedule_id', sa.String(length=64), nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('fields_json', sa.Text(), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('changed_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('schedule_changes', schema=None) as batch_op:
        batch_op.create_index('ix_schedule_changes_owner', ['project_id', 'agent_id', 'user_id', 'changed_at'], unique=False)
        batch_op.create_index('ix_schedule_changes_schedule', ['schedule_id', 'changed_at'], unique=False)
        batch_op.create_index('ix_schedule_changes_changed_at', ['changed_at'], unique=False)

    with op.batch_alter_table('webhook_attempts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agent_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('user_id', sa.String(length=128), nullable=True))
    op.execute(
        "UPDATE webhook_attempts SET "
        "agent_id = (SELECT n.agent_id FROM notifications n WHERE n.id = webhook_attempts.event_id), "
        "user_id = (SELECT n.user_id FROM notifications n WHERE n.id = webhook_attempts.event_id)"
    )
    op.create_index('ix_webhook_attempts_owner', 'webhook_attempts', ['project_id', 'agent_id', 'user_id', 'created_at'], unique=False)

    op.create_index('ix_fires_fire_at', 'fires', ['fire_at'], unique=False)
    op.create_index('ix_wakeups_timeline', 'wakeups', ['project_id', 'agent_id', 'user_id', 'created_at'], unique=False)
    op.create_index('ix_trigger_events_timeline', 'trigger_events', ['project_id', 'agent_id', 'user_id', 'created_at'], unique=False)
    op.create_index('ix_notifications_timeline', 'notifications', ['project_id', 'agent_id', 'user_id', 'created_at'], unique=False)
    op.create_index(
        'ix_notifications_consumed',
        'notifications',
        ['project_id', 'agent_id', 'user_id', 'consumed_at'],
        unique=False,
        sqlite_where=sa.text(_CONSUMED),
        postgresql_where=sa.text(_CONSUMED),
    )
    op.create_index(
        'ix_notifications_consumed_at',
        'notifications',
        ['consumed_at'],
        unique=False,
        sqlite_where=sa.text(_CONSUMED),
        postgresql_where=sa.text(_CONSUMED),
    )
    op.create_index('ix_channel_attempts_created_at', 'channel_attempts', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_channel_attempts_created_at', table_name='channel_attempts')
    op.drop_index('ix_notifications_consumed_at', table_name='notifications')
    op.drop_index('ix_notifications_consumed', table_name='notifications')
    op.drop_index('ix_notifications_timeline', table_name='notifications')
    op.drop_index('ix_trigger_events_timeline', table_name='trigger_events')
    op.drop_index('ix_wakeups_timeline', table_name='wakeups')
    op.drop_index('ix_fires_fire_at', table_name='fires')
    op.drop_index('ix_webhook_attempts_owner', table_name='webhook_attempts')
    with op.batch_alter_table('webhook_attempts', schema=None) as batch_op:
        batch_op.drop_column('user_id')
        batch_op.drop_column('agent_id')
    with op.batch_alter_table('schedule_changes', schema=None) as batch_op:
        batch_op.drop_index('ix_schedule_changes_changed_at')
        batch_op.drop_index('ix_schedule_changes_schedule')
        batch_op.drop_index('ix_schedule_changes_owner')
    op.drop_table('schedule_changes')
