"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import delivery.store.types


revision: str = '0001'
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table('clock_offsets',
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('offset_s', sa.Float(), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('project_id', 'agent_id', 'user_id')
    )
    op.create_table('fires',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('schedule_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('fire_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('skip_reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('schedule_id', 'fire_at', name='uq_fires_schedule_fire_at')
    )
    with op.batch_alter_table('fires', schema=None) as batch_op:
        batch_op.create_index('ix_fires_owner', ['project_id', 'agent_id', 'user_id', 'fire_at'], unique=False)

    op.create_table('idempotency_records',
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('route', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
    sa.Column('key', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('request_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('status_code', sa.Integer(), nullable=False),
    sa.Column('response_body', sa.Text(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('project_id', 'route', 'key')
    )
    with op.batch_alter_table('idempotency_records', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_idempotency_records_expires_at'), ['expires_at'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('msg_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('sent_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('msg_id')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_unsent', ['sent_at', 'id'], unique=False)

    op.create_table('projects',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('advance_time_jobs',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('result_json', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('started_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('api_keys',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('key_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('prefix', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_project_id'), ['project_id'], unique=False)

    op.create_table('inventory_items',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('item_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('label', sa.Text(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('kb_node_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('properties_json', sa.Text(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('inventory_items', schema=None) as batch_op:
        batch_op.create_index('ix_inventory_owner', ['project_id', 'agent_id', 'user_id'], unique=False)

    op.create_table('notifications',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('source_type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('source_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('schedule_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('wakeup_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('trigger_event_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('event_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('check_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('intent', sa.Text(), nullable=False),
    sa.Column('generated_message', sa.Text(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=24), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('fire_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('payload_json', sa.Text(), nullable=False),
    sa.Column('ack_status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('acknowledged_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('consumed_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source_id', name='uq_notifications_source')
    )
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index('ix_notifications_project', ['project_id', 'ack_status', 'created_at'], unique=False)
        batch_op.create_index('ix_notifications_queue', ['project_id', 'agent_id', 'status', 'created_at'], unique=False)
        batch_op.create_index('ix_notifications_user', ['project_id', 'agent_id', 'user_id', 'status', 'created_at'], unique=False)

    op.create_table('schedules',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('cadence_type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('cadence_json', sa.Text(), nullable=False),
    sa.Column('timezone', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('active_window_json', sa.Text(), nullable=True),
    sa.Column('intent', sa.Text(), nullable=False),
    sa.Column('check_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('inventory_item_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('metadata_json', sa.Text(), nullable=True),
    sa.Column('starts_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('ends_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('anchor_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('next_fire_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_fire_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('claimed_until', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.create_index('ix_schedules_due', ['enabled', 'next_fire_at'], unique=False)
        batch_op.create_index('ix_schedules_owner', ['project_id', 'agent_id', 'user_id'], unique=False)

    op.create_table('trigger_events',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('event_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('event_description', sa.Text(), nullable=True),
    sa.Column('metadata_json', sa.Text(), nullable=True),
    sa.Column('messages_json', sa.Text(), nullable=True),
    sa.Column('language', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('instance_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('trigger_events', schema=None) as batch_op:
        batch_op.create_index('ix_trigger_events_owner', ['project_id', 'agent_id', 'created_at'], unique=False)

    op.create_table('wakeups',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('check_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('intent', sa.Text(), nullable=False),
    sa.Column('occasion', sa.Text(), nullable=True),
    sa.Column('interest_topic', sa.Text(), nullable=True),
    sa.Column('event_description', sa.Text(), nullable=True),
    sa.Column('inventory_item_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True),
    sa.Column('scheduled_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('executed_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('cancelled_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('claimed_until', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('wakeups', schema=None) as batch_op:
        batch_op.create_index('ix_wakeups_due', ['status', 'scheduled_at'], unique=False)
        batch_op.create_index('ix_wakeups_owner', ['project_id', 'agent_id', 'user_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('wakeups', schema=None) as batch_op:
        batch_op.drop_index('ix_wakeups_owner')
        batch_op.drop_index('ix_wakeups_due')

    op.drop_table('wakeups')
    with op.batch_alter_table('trigger_events', schema=None) as batch_op:
        batch_op.drop_index('ix_trigger_events_owner')

    op.drop_table('trigger_events')
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.drop_index('ix_schedules_owner')
        batch_op.drop_index('ix_schedules_due')

    op.drop_table('schedules')
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_user')
        batch_op.drop_index('ix_notifications_queue')
        batch_op.drop_index('ix_notifications_project')

    op.drop_table('notifications')
    with op.batch_alter_table('inventory_items', schema=None) as batch_op:
        batch_op.drop_index('ix_inventory_owner')

    op.drop_table('inventory_items')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_project_id'))

    op.drop_table('api_keys')
    op.drop_table('advance_time_jobs')
    op.drop_table('projects')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_unsent')

    op.drop_table('outbox')
    with op.batch_alter_table('idempotency_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_idempotency_records_expires_at'))

    op.drop_table('idempotency_records')
    with op.batch_alter_table('fires', schema=None) as batch_op:
        batch_op.drop_index('ix_fires_owner')

    op.drop_table('fires')
    op.drop_table('clock_offsets')

