"""inbox states, endpoint health and channel fallback

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04

Inbox states: ``notifications.seen_at`` / ``read_at`` / ``archived_at``, three
independent flags kept as the instant each was set, beside the queue ``status``
(which stays the one state polling and webhooks share). Nullable: every existing
message is unseen, unread and not archived.

Endpoint health: ``webhook_endpoints.failing_since`` (the first failure of the
current streak, cleared by a 2xx) and ``disabled_at`` (when it was disabled, the
instant a re-enable offers to recover from).

Channel fallback: ``channel_fallbacks``, one row per message sent one channel at
a time (the order, the current channel, its deadline, the claim and every
decision taken).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import delivery.store.types


revision: str = '0014'
down_revision: str | Sequence[str] | None = '0013'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('notifications') as batch:
        batch.add_column(sa.Column('seen_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('read_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('archived_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.add_column(sa.Column('disabled_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('failing_since', delivery.store.types.UTCDateTime(timezone=True), nullable=True))


    op.create_table('channel_fallbacks',
    sa.Column('notification_id', sa.String(length=64), nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('agent_id', sa.String(length=128), nullable=False),
    sa.Column('user_id', sa.String(length=128), nullable=False),
    sa.Column('order_json', sa.Text(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('attempt_number', sa.Integer(), nullable=False),
    sa.Column('step_deadline', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True),
    sa.Column('claim', sa.String(length=64), nullable=True),
    sa.Column('sending', sa.Boolean(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('decisions_json', sa.Text(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('notification_id')
    )
    with op.batch_alter_table('channel_fallbacks', schema=None) as batch_op:
        batch_op.create_index('ix_channel_fallbacks_due', ['next_attempt_at'], unique=False)
        batch_op.create_index('ix_channel_fallbacks_updated_at', ['updated_at'], unique=False)
        batch_op.create_index('ix_channel_fallbacks_owner', ['project_id', 'agent_id', 'user_id', 'updated_at'], unique=False)


def downgrade() -> None:
    op.drop_table('channel_fallbacks')
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.drop_column('failing_since')
        batch.drop_column('disabled_at')
    with op.batch_alter_table('notifications') as batch:
        batch.drop_column('archived_at')
        batch.drop_column('read_at')
        batch.drop_column('seen_at')
