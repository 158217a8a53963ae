"""
Projects and their API keys: the tenancy every other store filters on.

A key is stored as its SHA-256 only (:func:`hash_api_key`), so a database
dump does not hand out credentials; the clear key exists once, in the answer
that created it.
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import ColumnElement, case, or_, select, update

from delivery.cadence import format_utc
from delivery.store.common import StoreBase, insert_ignoring_duplicates, new_id
from delivery.store.tables import API_KEYS, PROJECTS, ProjectRow


def hash_api_key(key: str) -> str:
    """The stored form of an API key: hex SHA-256 (keys are random, so no salt is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """
    What an operator may see of a stored key: never the key, only its first characters.

    Attributes:
        revoked_at: when the key stops (stopped) working; ``None`` while it works.
            A rotated key may stop in the future: it keeps working until then.
    """

    id: str
    project_id: str
    project_name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    def as_json(self) -> dict[str, str | None]:
        """The key as the CLI's ``--json`` and the admin routes show it (never the key)."""
        return {
            "id": self.id,
            "project_id": self.project_id,
            "project": self.project_name,
            "prefix": self.prefix,
            "created_at": format_utc(self.created_at),
            "revoked_at": None if self.revoked_at is None else format_utc(self.revoked_at),
        }


def _live(now: datetime) -> ColumnElement[bool]:
    # A rotated key stays live until its grace ends.
    return or_(API_KEYS.c.revoked_at.is_(None), API_KEYS.c.revoked_at > now)


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

    async def project_for_key(self, key: str, now: datetime) -> str | None:
        """The project id ``key`` belongs to while it is not revoked at ``now``, or ``None``."""
        ...

    async def list_keys(self, project_name: str | None = None) -> list[KeyInfo]:
        """Every key (of one project when named), oldest first."""
        ...

    async def revoke_key(self, key_id: str, now: datetime) -> KeyInfo | None:
        """Revoke ``key_id`` at ``now`` (an earlier revocation stands); ``None`` if unknown."""
        ...

    async def rotate_key(
        self, key_id: str, now: datetime, *, grace: timedelta = timedelta(0)
    ) -> tuple[KeyInfo, str] | None:
        """
        A new key for ``key_id``'s project, and ``key_id`` revoked at ``now + grace``;
        the new key's info and the key in clear, or ``None`` if ``key_id`` is unknown
        or already revoked.
        """
        ...


def _new_key() -> str:
    return f"dlv_{secrets.token_urlsafe(32)}"


def _key_row(key_id: str, project_id: str, key: str, now: datetime) -> dict[str, object]:
    return {
        "id": key_id,
        "project_id": project_id,
        "key_hash": hash_api_key(key),
        "prefix": key[:12],
        "created_at": now,
        "revoked_at": None,
    }


_INFO = select(
    API_KEYS.c.id,
    API_KEYS.c.project_id,
    PROJECTS.c.name.label("project_name"),
    API_KEYS.c.prefix,
    API_KEYS.c.created_at,
    API_KEYS.c.revoked_at,
).join(PROJECTS, PROJECTS.c.id == API_KEYS.c.project_id)


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
        key = key or _new_key()
        row = _key_row(new_id("key"), project_id, key, now)
        async with self.write() as conn:
            await insert_ignoring_duplicates(conn, API_KEYS, [row], unique=["key_hash"])
        return key

    async def project_for_key(self, key: str, now: datetime) -> str | None:
        """The project id ``key`` belongs to while it is not revoked at ``now``, or ``None``."""
        stmt = select(API_KEYS.c.project_id).where(
            API_KEYS.c.key_hash == hash_api_key(key), _live(now)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).scalar_one_or_none()

    async def list_keys(self, project_name: str | None = None) -> list[KeyInfo]:
        """Every key (of one project when named), oldest first."""
        stmt = _INFO.order_by(API_KEYS.c.created_at, API_KEYS.c.id)
        if project_name is not None:
            stmt = stmt.where(PROJECTS.c.name == project_name)
        async with self.read() as conn:
            return [KeyInfo(**row._mapping) for row in await conn.execute(stmt)]

    async def revoke_key(self, key_id: str, now: datetime) -> KeyInfo | None:
        """
        Revoke ``key_id`` at ``now``; ``None`` if there is no such key.

        Idempotent: a key revoked already keeps its first instant, unless that lies
        in the future (a rotation's grace), which revoking now cuts short.
        """
        async with self.write() as conn:
            await conn.execute(
                update(API_KEYS).where(API_KEYS.c.id == key_id, _live(now)).values(revoked_at=now)
            )
            row = (await conn.execute(_INFO.where(API_KEYS.c.id == key_id))).one_or_none()
        return None if row is None else KeyInfo(**row._mapping)

    async def rotate_key(
        self, key_id: str, now: datetime, *, grace: timedelta = timedelta(0)
    ) -> tuple[KeyInfo, str] | None:
        """
        A new key for ``key_id``'s project, with ``key_id`` revoked at ``now + grace``,
        in one transaction: never both keys dead, never a new key beside an old one
        that was meant to end.

        Returns:
            The new key's info and the key in clear (shown once), or ``None`` when
            ``key_id`` is unknown or no longer works.
        """
        key = _new_key()
        async with self.write() as conn:
            old = (
                await conn.execute(
                    update(API_KEYS)
                    .where(API_KEYS.c.id == key_id, _live(now))
                    # A key already ending (rotated before, still in its grace) keeps
                    # the earlier end: rotating again never lengthens an old key's life.
                    .values(
                        revoked_at=case(
                            (
                                or_(
                                    API_KEYS.c.revoked_at.is_(None),
                                    API_KEYS.c.revoked_at > now + grace,
                                ),
                                now + grace,
                            ),
                            else_=API_KEYS.c.revoked_at,
                        )
                    )
                    .returning(API_KEYS.c.project_id)
                )
            ).one_or_none()
            if old is None:
                return None
            row = _key_row(new_id("key"), old.project_id, key, now)
            await conn.execute(API_KEYS.insert().values(**row))
            info = (await conn.execute(_INFO.where(API_KEYS.c.id == row["id"]))).one()
        return KeyInfo(**info._mapping), key
