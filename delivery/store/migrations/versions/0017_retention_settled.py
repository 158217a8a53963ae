"""retention of settled notifications: a partial index on their creation instant

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04

Retention prunes suppressed, superseded, expired and system notifications by when
they were made; this index finds the oldest of them without scanning the table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0017'
down_revision: str | Sequence[str] | None = '0016'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Literal, as in delivery.store.tables.core.SETTLED_PREDICATE at this revision: a
# migration never changes with the code after it.
_SETTLED = "status IN ('suppressed', 'superseded', 'expired', 'system')"


def upgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.create_index(
            'ix_notifications_settled', ['created_at'], unique=False,
            sqlite_where=sa.text(_SETTLED),
            postgresql_where=sa.text(_SETTLED),
        )


def downgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_settled')
