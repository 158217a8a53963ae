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

SECRET_KEY_CHECK: Final = "secret_key_check"  # noqa: S105 - a fact's name
"""A value sealed with the deployment's key; every part must open it."""


class Facts(Protocol):
    """Named deployment values; the first value written for a name stays."""

    async def claim(self, name: str, value: str, now: datetime) -> str:
        """Store ``value`` under ``name`` unless one is there; the value in force."""
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
