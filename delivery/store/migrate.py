"""
Apply the Alembic migrations in ``delivery/store/migrations`` to a database.

``delivery migrate`` calls :func:`migrate`, and so do ``delivery web`` / ``run``
on start; several processes may start at once, so the upgrade is serialised
(a PostgreSQL advisory lock, an immediate SQLite write transaction).

Alembic (and Mako, which it loads) is imported only when there is something to
upgrade: a daemon restarting on an up-to-date schema, the usual case, checks the
stored revision with one query against :func:`shipped_head` and never loads them,
which keeps about 9 MB out of the long-running process (``bench/bench_rss.py``).

A migration that rewrites sealed values (``0007``: contact destinations) needs the
deployment's key: callers pass ``secrets``, a factory the migration calls only when
it has rows to rewrite, so an empty or up-to-date database never reads (or creates)
the key file.
"""

import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.engine import create_engine, is_sqlite

if TYPE_CHECKING:
    from alembic.config import Config

    from delivery.secrets import SecretBox

SECRETS_ATTRIBUTE = "secret_box_factory"
"""Alembic ``config.attributes`` key of the ``secrets`` factory (read by migrations)."""

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Any constant works; it only has to be the same in every process of a deployment.
_PG_LOCK_KEY = 0x5D17E21
_log = structlog.get_logger(__name__)


def alembic_config() -> "Config":
    """The Alembic config pointing at our script directory (no URL: callers pass a connection)."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest revision id shipped with this code, as Alembic reads it."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the initial migration always exists
        raise RuntimeError("no migrations found")
    return head


_REVISION = re.compile(r"^revision: str = '(\w+)'$", re.MULTILINE)
_DOWN = re.compile(r"^down_revision: .* = '(\w+)'$", re.MULTILINE)


@cache
def shipped_head() -> str:
    """
    :func:`head_revision` without importing Alembic: the one revision of the
    ``versions`` scripts that no script names as its ``down_revision``.
    """
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in (MIGRATIONS_DIR / "versions").glob("*.py"):
        source = script.read_text(encoding="utf-8")
        revisions.update(_REVISION.findall(source))
        parents.update(_DOWN.findall(source))
    heads = revisions - parents
    if len(heads) != 1:  # pragma: no cover - the history is linear
        raise RuntimeError(f"expected one migration head, found {sorted(heads)}")
    return heads.pop()


async def stored_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or ``None`` (no ``alembic_version`` table yet)."""
    try:
        async with engine.connect() as conn:
            return (
                await conn.execute(text("SELECT version_num FROM alembic_version"))
            ).scalar_one_or_none()
    except DBAPIError:
        return None


def _upgrade(
    connection: Connection,
    revision: str,
    secrets: "Callable[[], SecretBox] | None",
) -> str | None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    before = MigrationContext.configure(connection).get_current_revision()
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    cfg.attributes[SECRETS_ATTRIBUTE] = secrets
    command.upgrade(cfg, revision)
    return before


async def migrate(
    url: str,
    revision: str = "head",
    *,
    secrets: "Callable[[], SecretBox] | None" = None,
) -> None:
    """
    Upgrade the database at ``url`` to ``revision`` (default: the newest); idempotent.

    Everything runs in one transaction (both databases have transactional DDL),
    so a failed upgrade leaves the schema as it was.

    Args:
        url: a SQLAlchemy async URL (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).
        revision: an Alembic revision id or ``head``.
        secrets: builds the deployment's :class:`~delivery.secrets.SecretBox`, for
            migrations that seal or open stored values; without it such a migration
            fails (and changes nothing) when it has rows to rewrite.
    """
    engine = create_engine(url)
    try:
        if revision == "head" and await stored_revision(engine) == shipped_head():
            _log.info("database up to date", revision=shipped_head())
            return
        async with engine.connect() as conn:
            if is_sqlite(url):
                # Take the write lock up front: two processes migrating at once
                # then queue on busy_timeout instead of failing a lock upgrade.
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            before = await conn.run_sync(_upgrade, revision, secrets)
            await conn.commit()
        _log.info("database migrated", revision=revision, previous=before)
    finally:
        await engine.dispose()
