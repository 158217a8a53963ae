"""
Apply the Alembic migrations in ``delivery/store/migrations`` to a database.

``delivery migrate`` calls :func:`migrate`, and so do ``delivery web`` / ``run``
on start; several processes may start at once, so the upgrade is serialised
(a PostgreSQL advisory lock, an immediate SQLite write transaction).
"""

from pathlib import Path

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from delivery.store.engine import create_engine, is_sqlite

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Any constant works; it only has to be the same in every process of a deployment.
_PG_LOCK_KEY = 0x5D17E21
_log = structlog.get_logger(__name__)


def alembic_config() -> Config:
    """The Alembic config pointing at our script directory (no URL: callers pass a connection)."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest revision id shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the initial migration always exists
        raise RuntimeError("no migrations found")
    return head


def _upgrade(connection: Connection, revision: str) -> str | None:
    before = MigrationContext.configure(connection).get_current_revision()
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)
    return before


async def migrate(url: str, revision: str = "head") -> None:
    """
    Upgrade the database at ``url`` to ``revision`` (default: the newest); idempotent.

    Everything runs in one transaction (both databases have transactional DDL),
    so a failed upgrade leaves the schema as it was.

    Args:
        url: a SQLAlchemy async URL (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).
        revision: an Alembic revision id or ``head``.
    """
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            if is_sqlite(url):
                # Take the write lock up front: two processes migrating at once
                # then queue on busy_timeout instead of failing a lock upgrade.
                await conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            before = await conn.run_sync(_upgrade, revision)
            await conn.commit()
        _log.info("database migrated", revision=revision, previous=before)
    finally:
        await engine.dispose()
