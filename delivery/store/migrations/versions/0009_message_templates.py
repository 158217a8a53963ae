"""message templates: per project and check type, versioned; how each notification was composed

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

New tables ``message_templates`` (one current body per project, check type and
source) and ``message_template_versions`` (every body a template has had), and a
nullable ``notifications.composer`` (template, default, llm, template_fallback,
default_fallback) so an operator can see which notifications an LLM failure or a
failing template sent with a fallback. The column is added in place (SQLite's
ADD COLUMN; no table copy), and existing rows keep NULL: how they were composed
was not recorded.
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import delivery.store.types


revision: str = '0009'
down_revision: str | Sequence[str] | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('message_templates',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('project_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('check_type', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('project_id', 'check_type', 'source', name='uq_message_templates_scope')
    )
    op.create_table('message_template_versions',
    sa.Column('template_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('body', sa.Text(), nullable=False),
    sa.Column('created_at', delivery.store.types.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['template_id'], ['message_templates.id'], ),
    sa.PrimaryKeyConstraint('template_id', 'version')
    )
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.add_column(sa.Column('composer', sqlmodel.sql.sqltypes.AutoString(length=24), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('notifications', schema=None) as batch_op:
        batch_op.drop_column('composer')

    op.drop_table('message_template_versions')
    op.drop_table('message_templates')
