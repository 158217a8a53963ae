"""outbox headers: the request id and trace context a message carries to NATS

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04

A message an API request caused (a trigger event, then its notification) carries
the request's id and, when tracing is on, its W3C trace context. They are stored
beside the payload, which stays exactly what consumers read, and the relay sends
them as NATS headers. Nullable: most rows (scheduler fires) carry none.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0011'
down_revision: str | Sequence[str] | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('outbox') as batch:
        batch.add_column(sa.Column('headers', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outbox') as batch:
        batch.drop_column('headers')
