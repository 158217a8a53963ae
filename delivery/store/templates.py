"""
Message templates in the store: what the API manages and what the dispatcher reads.

A template is unique per (project, ``check_type``, ``source``). Creating one
writes version 1; each update writes the next version and keeps every earlier
body in ``message_template_versions``, in the same transaction as the change.
Bodies arrive here already checked (:func:`delivery.templates.check_template`):
the store keeps text, it does not judge it.
"""

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.engine import RowMapping

from delivery.store.common import StoreBase, insert_ignoring_duplicates, new_id, owned
from delivery.store.tables import TEMPLATE_VERSIONS, TEMPLATES

_t = TEMPLATES.c
_v = TEMPLATE_VERSIONS.c

BOOK_COLUMNS = (_t.project_id, _t.check_type, _t.source, _t.body, _t.version)
"""What the dispatcher reads of a template."""


class MessageTemplates(Protocol):
    """
    A project's templates as the API manages them.

    Invariants: every method filters on ``project_id`` (another project's id is
    unknown); ``version`` starts at 1 and grows by one per update, and the body of
    every version, the current one included, stays readable.
    """

    async def create_template(
        self, project_id: str, *, check_type: str, source: str, body: str, now: datetime
    ) -> RowMapping | None:
        """The new template (version 1), or ``None`` when its (check_type, source) has one."""
        ...

    async def list_templates(self, project_id: str) -> Sequence[RowMapping]:
        """The project's templates, by check type then source."""
        ...

    async def get_template(self, project_id: str, template_id: str) -> RowMapping | None:
        """One template, or ``None``."""
        ...

    async def update_template(
        self, project_id: str, template_id: str, *, body: str, now: datetime
    ) -> RowMapping | None:
        """Replace the body as the next version; the updated template, or ``None``."""
        ...

    async def template_versions(
        self, project_id: str, template_id: str
    ) -> Sequence[RowMapping] | None:
        """Every version, newest first; ``None`` when the template is unknown."""
        ...

    async def delete_template(self, project_id: str, template_id: str) -> bool:
        """Delete a template and its versions; False when it is unknown."""
        ...


class TemplateSource(Protocol):
    """What the dispatcher reads: whole projects' templates at once."""

    async def project_templates(self, project_ids: Iterable[str]) -> dict[str, list[RowMapping]]:
        """
        The templates of each project (:data:`BOOK_COLUMNS`), in one query;
        a project without templates maps to an empty list.
        """
        ...


class TemplateStore(StoreBase):
    """:class:`MessageTemplates` and :class:`TemplateSource` on SQLite and PostgreSQL."""

    async def create_template(
        self, project_id: str, *, check_type: str, source: str, body: str, now: datetime
    ) -> RowMapping | None:
        """See :meth:`MessageTemplates.create_template`; safe under concurrent creations."""
        template_id = new_id("tpl")
        row = {
            "id": template_id,
            "project_id": project_id,
            "check_type": check_type,
            "source": source,
            "body": body,
            "version": 1,
            "created_at": now,
            "updated_at": now,
        }
        async with self.write() as conn:
            inserted = await insert_ignoring_duplicates(
                conn, TEMPLATES, [row], unique=["project_id", "check_type", "source"]
            )
            if not inserted:
                return None
            await conn.execute(
                TEMPLATE_VERSIONS.insert().values(
                    template_id=template_id, version=1, body=body, created_at=now
                )
            )
            return (
                (await conn.execute(select(TEMPLATES).where(_t.id == template_id))).mappings().one()
            )

    async def list_templates(self, project_id: str) -> Sequence[RowMapping]:
        """See :meth:`MessageTemplates.list_templates`."""
        stmt = (
            select(TEMPLATES)
            .where(*owned(TEMPLATES, project_id))
            .order_by(_t.check_type, _t.source, _t.id)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def get_template(self, project_id: str, template_id: str) -> RowMapping | None:
        """See :meth:`MessageTemplates.get_template`."""
        stmt = select(TEMPLATES).where(*owned(TEMPLATES, project_id, id=template_id))
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().one_or_none()

    async def update_template(
        self, project_id: str, template_id: str, *, body: str, now: datetime
    ) -> RowMapping | None:
        """
        See :meth:`MessageTemplates.update_template`. The ``UPDATE ... version + 1``
        takes the row lock (PostgreSQL) or runs under the write lock (SQLite), so two
        concurrent updates get two versions, never the same one.
        """
        async with self.write() as conn:
            updated = (
                (
                    await conn.execute(
                        update(TEMPLATES)
                        .where(*owned(TEMPLATES, project_id, id=template_id))
                        .values(body=body, version=_t.version + 1, updated_at=now)
                        .returning(*TEMPLATES.c)
                    )
                )
                .mappings()
                .one_or_none()
            )
            if updated is None:
                return None
            await conn.execute(
                TEMPLATE_VERSIONS.insert().values(
                    template_id=template_id, version=updated["version"], body=body, created_at=now
                )
            )
        return updated

    async def template_versions(
        self, project_id: str, template_id: str
    ) -> Sequence[RowMapping] | None:
        """See :meth:`MessageTemplates.template_versions`."""
        async with self.write() as conn:
            # One transaction, so the versions agree with the ownership check.
            found = (
                await conn.execute(
                    select(_t.id).where(*owned(TEMPLATES, project_id, id=template_id))
                )
            ).first()
            if found is None:
                return None
            stmt = (
                select(_v.version, _v.body, _v.created_at)
                .where(_v.template_id == template_id)
                .order_by(_v.version.desc())
            )
            return (await conn.execute(stmt)).mappings().all()

    async def delete_template(self, project_id: str, template_id: str) -> bool:
        """See :meth:`MessageTemplates.delete_template`."""
        async with self.write() as conn:
            # The row lock keeps a concurrent update from adding a version between the
            # two deletes (its version row would then point at a deleted template).
            found = (
                await conn.execute(
                    select(_t.id)
                    .where(*owned(TEMPLATES, project_id, id=template_id))
                    .with_for_update()
                )
            ).first()
            if found is None:
                return False
            await conn.execute(delete(TEMPLATE_VERSIONS).where(_v.template_id == template_id))
            await conn.execute(delete(TEMPLATES).where(_t.id == template_id))
        return True

    async def project_templates(self, project_ids: Iterable[str]) -> dict[str, list[RowMapping]]:
        """See :meth:`TemplateSource.project_templates`."""
        ids = sorted(set(project_ids))
        out: dict[str, list[RowMapping]] = {p: [] for p in ids}
        if not ids:
            return out
        stmt = select(*BOOK_COLUMNS).where(_t.project_id.in_(ids))
        async with self.read() as conn:
            for row in (await conn.execute(stmt)).mappings():
                out[row["project_id"]].append(row)
        return out
