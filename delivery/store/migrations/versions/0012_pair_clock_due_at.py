"""pair clocks: schedules.due_at and wakeups.due_at (real due instant of an advanced pair)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04

An advanced (agent, user) pair keeps every instant on its own clock (real time
plus its offset). The scheduler claims in real time, so such a pair's rows carry
``due_at``: the instant minus the offset. NULL (every other row) means the
instant itself is due in real time, so the existing claim index stays as it is
and only the few shifted rows use the new one. Rows of pairs advanced before this
migration get their ``due_at`` here; until now they fired in real time at their
simulated instants.
"""

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

import delivery.store.types


revision: str = '0012'
down_revision: str | Sequence[str] | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _when() -> delivery.store.types.UTCDateTime:
    return delivery.store.types.UTCDateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.add_column(sa.Column('due_at', _when(), nullable=True))
        batch_op.create_index('ix_schedules_shifted', ['enabled', 'due_at'], unique=False)
    with op.batch_alter_table('wakeups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('due_at', _when(), nullable=True))
        batch_op.create_index('ix_wakeups_shifted', ['status', 'due_at'], unique=False)
    _backfill()


def _owner() -> list[sa.ColumnClause[object]]:
    # Fresh column objects per table: a column belongs to one table only.
    return [sa.column('project_id'), sa.column('agent_id'), sa.column('user_id')]


def _backfill() -> None:
    bind = op.get_bind()
    offsets = sa.table('clock_offsets', *_owner(), sa.column('offset_s'))
    schedules = sa.table(
        'schedules', sa.column('id'), *_owner(), sa.column('next_fire_at', _when()),
        sa.column('due_at', _when()), sa.column('enabled'),
    )
    wakeups = sa.table(
        'wakeups', sa.column('id'), *_owner(), sa.column('scheduled_at', _when()),
        sa.column('due_at', _when()), sa.column('status'),
    )
    for project_id, agent_id, user_id, offset_s in bind.execute(sa.select(offsets)).all():
        if not offset_s:
            continue
        shift = timedelta(seconds=float(offset_s))
        for table, instant, live in (
            (schedules, 'next_fire_at', schedules.c.enabled.is_(True)),
            (wakeups, 'scheduled_at', wakeups.c.status == 'pending'),
        ):
            mine = (
                (table.c.project_id == project_id)
                & (table.c.agent_id == agent_id)
                & (table.c.user_id == user_id)
            )
            rows = bind.execute(
                sa.select(table.c.id, table.c[instant]).where(mine, live, table.c[instant].is_not(None))
            ).all()
            for row_id, at in rows:
                bind.execute(sa.update(table).where(table.c.id == row_id).values(due_at=at - shift))


def downgrade() -> None:
    with op.batch_alter_table('wakeups', schema=None) as batch_op:
        batch_op.drop_index('ix_wakeups_shifted')
        batch_op.drop_column('due_at')
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.drop_index('ix_schedules_shifted')
        batch_op.drop_column('due_at')
