"""
Projects and their API keys: the tenancy every other store filters on.

A key is stored as its SHA-256 only (:func:`hash_api_key`), so a database
dump does not hand out credentials; the clear key exists once, in the answer
that created it.
"""

import hashlib
import secrets
from datetime import datetime
from typing import Protocol

from sqlalchemy import select

from delivery.store.common import StoreBase, insert_ignoring_duplicates, new_id
from delivery.store.tables import API_KEYS, PROJECTS, ProjectRow


def hash_api_key(key: str) -> str:
    """The stored form of an API key: hex SHA-256 (keys are random, so no salt is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


class Keys(Protocol):
    """
    Projects and API keys.

    Invariants: project names are unique, so ensuring one twice gives the same
    project; storing the same key twice is a no-op; a revoked key resolves to
    no project.
    """

    async def ensure_project(self, name: str, now: datetime) -> ProjectRow:
        """The project called ``name``, created if it does not exist yet."""
        ...

    async def create_api_key(self, project_id: str, now: datetime, key: str | None = None) -> str:
        """Store a key for ``project_id`` (random unless given) and return it in clear."""
        ...

    async def project_for_key(self, key: str) -> str | None:
        """The project id an unrevoked ``key`` belongs to, or ``None``."""
        ...


class KeyStore(StoreBase):
    """:class:`Keys` on SQLite and PostgreSQL."""

    async def ensure_project(self, name: str, now: datetime) -> ProjectRow:
        """The project called ``name``, created (``proj_…``) if it does not exist yet."""
        async with self.write() as conn:
            await insert_ignoring_duplicates(
                conn,
                PROJECTS,
                [{"id": new_id("proj"), "name": name, "created_at": now}],
                unique=["name"],
            )
            row = (await conn.execute(select(PROJECTS).where(PROJECTS.c.name == name))).one()
        return ProjectRow(**row._mapping)

    async def create_api_key(self, project_id: str, now: datetime, key: str | None = None) -> str:
        """
        Store a new API key for ``project_id`` and return it in clear, the only time it exists.

        Args:
            key: use this key instead of a random one (the bootstrap key);
                storing the same key twice is a no-op.
        """
        key = key or f"dlv_{secrets.token_urlsafe(32)}"
        async with self.write() as conn:
            await insert_ignoring_duplicates(
                conn,
                API_KEYS,
                [
                    {
                        "id": new_id("key"),
                        "project_id": project_id,
                        "key_hash": hash_api_key(key),
                        "prefix": key[:12],
                        "created_at": now,
                        "revoked_at": None,
                    }
                ],
                unique=["key_hash"],
            )
        return key

    async def project_for_key(self, key: str) -> str | None:
        """The project id an unrevoked ``key`` belongs to, or ``None``."""
        stmt = select(API_KEYS.c.project_id).where(
            API_KEYS.c.key_hash == hash_api_key(key), API_KEYS.c.revoked_at.is_(None)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).scalar_one_or_none()
