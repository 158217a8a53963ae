"""channels: contacts, channel preferences, notification channels, channel attempts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import delivery.store.types


revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('channel_attempts',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('notification_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('contact_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('destination', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('response_code', sa.Integer(), nullable=False),
    sa.Column('duration_ms', sa.Integer(), nullable=False),
    sa.Column('attempt_number', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('channel_attempts', schema=None) as batch_op:
        batch_op.create_index('ix_channel_attempts_due', ['next_attempt_at'], unique=False)
        batch_op.create_index('ix_channel_attempts_notification', ['notification_id', 'created_at'], unique=False)
        batch_op.create_index('ix_channel_attempts_owner', ['project_id', 'agent_id', 'user_id', 'created_at'], unique=False)

    op.create_table('channel_preferences',
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('preferences_json', sa.Text(), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('project_id', 'agent_id', 'user_id')
    )
    op.create_table('contacts',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('agent_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('destination', sa.Text(), nullable=False),
    sa.Column('destination_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('opted_out', sa.Boolean(), nullable=False),
    sa.Column('disabled', sa.Boolean(), nullable=False),
    sa.Column('disabled_reason', sa.Text(), nullable=True),
    sa.Column('disabled_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'agent_id', 'user_id', 'kind', 'destination_hash', name='uq_contacts_destination')
    )
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.create_index('ix_contacts_owner', ['project_id', 'agent_id', 'user_id'], unique=False)

    op.create_table('notification_channels',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('config_json', sa.Text(), nullable=False),
    sa.Column('secrets_enc', sa.Text(), nullable=True),
    sa.Column('events_json', sa.Text(), nullable=False),
    sa.Column('filter_json', sa.Text(), nullable=True),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('notification_channels', schema=None) as batch_op:
        batch_op.create_index('ix_notification_channels_project', ['project_id', 'created_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('notification_channels', schema=None) as batch_op:
        batch_op.drop_index('ix_notification_channels_project')

    op.drop_table('notification_channels')
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.drop_index('ix_contacts_owner')

    op.drop_table('contacts')
    op.drop_table('channel_preferences')
    with op.batch_alter_table('channel_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_channel_attempts_owner')
        batch_op.drop_index('ix_channel_attempts_notification')
        batch_op.drop_index('ix_channel_attempts_due')

    op.drop_table('channel_attempts')
