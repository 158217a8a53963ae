"""
Message templates: one current body per (project, check type, source), and every
body it ever had.

``message_templates`` holds the current body and its ``version`` (1 on creation,
one more per update); ``message_template_versions`` keeps each version's body, the
current one included, so an update never loses what was sent before it.
"""

from datetime import datetime

from sqlalchemy import Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from delivery.store.types import UTCDateTime


class MessageTemplateRow(SQLModel, table=True):
    """
    A project's template for one ``check_type`` (``*``: every one) and ``source``
    (schedule | wakeup | event | any). The dispatcher reads a project's rows whole.
    """

    __tablename__ = "message_templates"
    __table_args__ = (
        UniqueConstraint("project_id", "check_type", "source", name="uq_message_templates_scope"),
    )

    id: str = Field(primary_key=True, max_length=64)
    project_id: str = Field(foreign_key="projects.id", max_length=64)
    check_type: str = Field(max_length=128)
    source: str = Field(max_length=16)
    body: str = Field(sa_type=Text)
    version: int = 1
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class MessageTemplateVersionRow(SQLModel, table=True):
    """One version of a template's body, written with the change that made it."""

    __tablename__ = "message_template_versions"

    template_id: str = Field(primary_key=True, max_length=64, foreign_key="message_templates.id")
    version: int = Field(primary_key=True)
    body: str = Field(sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
