"""webhook deliveries: the due index carries endpoint_id

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05

The claim leaves out endpoints already at their concurrency cap; with endpoint_id in
the due index that filter is read from the index entries, so a long backlog for one
slow endpoint is passed over without reading its rows.
"""

from collections.abc import Sequence

from alembic import op


revision: str = '0018'
down_revision: str | Sequence[str] | None = '0017'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_deliveries_due')
        batch_op.create_index(
            'ix_webhook_deliveries_due', ['status', 'next_attempt_at', 'endpoint_id'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('webhook_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_webhook_deliveries_due')
        batch_op.create_index(
            'ix_webhook_deliveries_due', ['status', 'next_attempt_at'], unique=False
        )
