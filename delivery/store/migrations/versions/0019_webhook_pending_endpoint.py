"""webhook deliveries: a partial index of the pending rows by endpoint and due time

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05

PostgreSQL checks the claim's endpoint filter of the due index on each table row, not
on the index; its claim now probes each endpoint with pending rows instead, through
this index (SQLite keeps its claim over the due index).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0019'
down_revision: str | Sequence[str] | None = '0018'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Literal: a migration never changes with the code after it.
_PENDING = "status = 'pending'"


def upgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.create_index(
            'ix_webhook_deliveries_pending',
            ['endpoint_id', 'next_attempt_at'],
            unique=False,
            postgresql_where=sa.text(_PENDING),
            sqlite_where=sa.text(_PENDING),
        )


def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_deliveries_pending')
