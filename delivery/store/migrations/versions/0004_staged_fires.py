"""staged fires: outbox.available_at and schedules.staged_fire_at (for bursts)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

The scheduler may plan a fire up to a minute before it is due ("lookahead"): the
fire row and its outbox entry commit early, and the relay publishes the entry only
once ``available_at`` has passed. Existing outbox rows were available when written,
so ``available_at`` is backfilled from ``created_at``. ``schedules.staged_fire_at``
is the planned-but-not-yet-due fire the API shows as ``next_fire_at``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import delivery.store.types


revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.add_column(sa.Column('available_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True))
    op.execute('UPDATE outbox SET available_at = created_at')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.alter_column('available_at', existing_type=delivery.store.types.UTCDateTime(timezone=True), nullable=False)
        batch_op.drop_index('ix_outbox_unsent')
        batch_op.create_index('ix_outbox_unsent', ['sent_at', 'available_at', 'id'], unique=False)
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('staged_fire_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.drop_column('staged_fire_at')
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_unsent')
        batch_op.create_index('ix_outbox_unsent', ['sent_at', 'id'], unique=False)
        batch_op.drop_column('available_at')
