"""deployment facts: small named values every part of a deployment shares

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04

One row per fact, written by the parts themselves: ``secret_key_check`` is a value
sealed with the deployment's key by the first part to start, which every later part
must open, so parts started with different ``DELIVERY_SECRET_KEY`` values fail at
start instead of at the first secret they cannot decrypt.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from delivery.store.types import UTCDateTime

revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'deployment_facts',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('value', sa.Text(), nullable=False),
        sa.Column('updated_at', UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('name'),
    )


def downgrade() -> None:
    op.drop_table('deployment_facts')
