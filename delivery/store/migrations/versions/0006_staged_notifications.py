"""staged notifications: a partial index on notifications.fire_at (for bursts)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

A fire staged by the scheduler's lookahead is now composed at once into a
notification with status ``staged``, hidden from every read, and the outbox relay
promotes it to ``pending`` at its fire instant. The relay looks for due staged
rows on every pass; this partial index holds only those rows, so the probe costs
nothing when there are none and the index costs nothing for other notifications.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        'ix_notifications_staged',
        'notifications',
        ['fire_at'],
        unique=False,
        sqlite_where=sa.text("status = 'staged'"),
        postgresql_where=sa.text("status = 'staged'"),
    )


def downgrade() -> None:
    op.drop_index('ix_notifications_staged', table_name='notifications')
