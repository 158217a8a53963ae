"""delivery policy: attention budget, quiet hours, freshness and supersede

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04

New tables ``delivery_policies`` (one JSON policy per project; absent means every
rule off), ``user_quiet_hours`` (per project and user, in the user's zone) and
``attention_counters`` (the per-user row a budget decision locks). A nullable
``policy_json`` on schedules, wakeups and trigger events carries a source's own
priority, quiet-hours action, deadline and supersede key. Notifications gain
``priority``, ``expires_at``, ``supersede_key`` and ``status_reason`` (why a
policy suppressed, expired or superseded one), all nullable and added in place,
with the indexes the budget count, the expiry sweep and the supersede update read.
Existing rows keep NULL: no policy applied to them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import delivery.store.types


revision: str = '0016'
down_revision: str | Sequence[str] | None = '0015'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('delivery_policies',
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('policy_json', sa.Text(), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('project_id')
    )
    op.create_table('user_quiet_hours',
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('timezone', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('start_minute', sa.Integer(), nullable=False),
    sa.Column('end_minute', sa.Integer(), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('project_id', 'user_id')
    )
    op.create_table('attention_counters',
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('touched_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('project_id', 'user_id')
    )
    for table in ('schedules', 'wakeups', 'trigger_events'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('policy_json', sa.Text(), nullable=True))
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(sa.Column('expires_at', delivery.store.types.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('supersede_key', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
        batch_op.add_column(sa.Column('status_reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.create_index('ix_notifications_attention', ['project_id', 'user_id', 'created_at'], unique=False)
        batch_op.create_index(
            'ix_notifications_expiring', ['expires_at'], unique=False,
            sqlite_where=sa.text("expires_at IS NOT NULL AND status IN ('pending', 'staged')"),
            postgresql_where=sa.text("expires_at IS NOT NULL AND status IN ('pending', 'staged')"),
        )
        batch_op.create_index(
            'ix_notifications_supersede', ['project_id', 'user_id', 'supersede_key'], unique=False,
            sqlite_where=sa.text('supersede_key IS NOT NULL'),
            postgresql_where=sa.text('supersede_key IS NOT NULL'),
        )


def downgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_index('ix_notifications_supersede')
        batch_op.drop_index('ix_notifications_expiring')
        batch_op.drop_index('ix_notifications_attention')
        batch_op.drop_column('status_reason')
        batch_op.drop_column('supersede_key')
        batch_op.drop_column('expires_at')
        batch_op.drop_column('priority')
    for table in ('trigger_events', 'wakeups', 'schedules'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('policy_json')
    op.drop_table('attention_counters')
    op.drop_table('user_quiet_hours')
    op.drop_table('delivery_policies')
