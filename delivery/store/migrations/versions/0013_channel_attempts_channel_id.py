"""channel attempts of project channels: channel_attempts.channel_id

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04

Proactive events now reach the project notification channels subscribed to them
through the channels worker, and ``deliver`` records its sends too: each attempt
names the channel it went to, listable per channel (``ix_channel_attempts_channel``).
NULL on the attempts to users' contacts.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision: str = '0013'
down_revision: str | Sequence[str] | None = '0012'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('channel_attempts', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('channel_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )
        batch_op.create_index(
            'ix_channel_attempts_channel', ['channel_id', 'created_at'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('channel_attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_channel_attempts_channel')
        batch_op.drop_column('channel_id')
