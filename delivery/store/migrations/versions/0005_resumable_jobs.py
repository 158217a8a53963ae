"""resumable advance-time jobs: simulated_hours and a lease

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

An ``async: true`` advance-time job used to live only in the API process's
memory: a restart left it ``running`` forever. The job row now keeps the call
(``simulated_hours``) and a lease (``lease_owner`` / ``lease_until``) that its
runner renews; the scheduler reruns a running job whose lease lapsed. Rows from
before this revision have no hours and are failed instead of rerun.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import delivery.store.types


revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('advance_time_jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('simulated_hours', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('lease_owner', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('lease_until', delivery.store.types.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('advance_time_jobs', schema=None) as batch_op:
        batch_op.drop_column('lease_until')
        batch_op.drop_column('lease_owner')
        batch_op.drop_column('simulated_hours')
