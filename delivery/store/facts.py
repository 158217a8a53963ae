"""
Deployment facts: small named values the parts of one deployment share.

The first writer of a fact wins (insert-ignore on its name), so parts starting
at once agree on one value; :meth:`FactStore.claim` hands back that value.
"""

from datetime import datetime
from typing import Final, Protocol

from sqlalchemy import select

from delivery.store.common import StoreBase, insert_ignoring_duplicates
from delivery.store.tables import FACTS

SCHEDULER_SEEN: Final = "scheduler_seen"
"""When a scheduler last said it runs (its heartbeat); the value is its owner id."""
SECRET_KEY_CHECK: Final = "secret_key_check"  # noqa: S105 - a fact's name
"""A value sealed with the deployment's key; every part must open it."""


class Facts(Protocol):
    """Named deployment values: claimed (first value stays) or put (last value wins)."""

    async def claim(self, name: str, value: str, now: datetime) -> str:
        """Store ``value`` under ``name`` unless one is there; the value in force."""
        ...

    async def put(self, name: str, value: str, now: datetime) -> None:
        """Store ``value`` under ``name``, replacing any, stamped ``now``."""
        ...

    async def updated_at(self, name: str) -> datetime | None:
        """When ``name`` was last written, or ``None`` if never."""
        ...


class FactStore(StoreBase):
    """:class:`Facts` on SQLite and PostgreSQL."""

    async def claim(self, name: str, value: str, now: datetime) -> str:
        """Store ``value`` under ``name`` unless one is there; the value in force."""
        async with self.write() as conn:
            row = {"name": name, "value": value, "updated_at": now}
            await insert_ignoring_duplicates(conn, FACTS, [row], unique=["name"])
            stored = await conn.execute(select(FACTS.c.value).where(FACTS.c.name == name))
            return str(stored.scalar_one())

    async def put(self, name: str, value: str, now: datetime) -> None:
        """Store ``value`` under ``name``, replacing any, stamped ``now``."""
        stmt = (
            self.capabilities.insert(FACTS)
            .values(name=name, value=value, updated_at=now)
            .on_conflict_do_update(
                index_elements=["name"], set_={"value": value, "updated_at": now}
            )
        )
        async with self.write() as conn:
            await conn.execute(stmt)

    async def updated_at(self, name: str) -> datetime | None:
        """When ``name`` was last written, or ``None`` if never."""
        async with self.read() as conn:
            stmt = select(FACTS.c.updated_at).where(FACTS.c.name == name)
            found: datetime | None = (await conn.execute(stmt)).scalar_one_or_none()
        return found
