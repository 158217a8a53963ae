"""webhook recovery: re-send one delivery, or every message for an endpoint since an instant

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-04

A delivery an operator re-sends goes back into the same durable queue row, so the
worker records its attempts as it does any other. ``round_start`` is the attempt
count when the current round began (0 for the first): the retry schedule counts
attempts from it, so a re-sent message gets the whole schedule again while attempt
numbers keep rising. ``force_send`` sends the message even though it was consumed
(an explicit re-send of a delivered message). The notifications index lets a
recovery find an event type's messages since an instant without a scan.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0015'
down_revision: str | Sequence[str] | None = '0014'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.add_column(
            sa.Column('round_start', sa.Integer(), nullable=False, server_default='0')
        )
        batch.add_column(
            sa.Column('force_send', sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_index(
        'ix_notifications_event_type',
        'notifications',
        ['project_id', 'event_type', 'created_at'],
    )


def downgrade() -> None:
    op.drop_index('ix_notifications_event_type', table_name='notifications')
    with op.batch_alter_table('webhook_deliveries') as batch:
        batch.drop_column('force_send')
        batch.drop_column('round_start')
