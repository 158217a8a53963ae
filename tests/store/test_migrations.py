"""The Alembic migrations build exactly the schema the table classes declare, on both databases."""

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from delivery.store.engine import create_engine
from delivery.store.migrate import head_revision, migrate
from delivery.store.tables import metadata


def _diff(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _state(conn: Connection) -> tuple[str | None, list[str]]:
    revision = MigrationContext.configure(conn).get_current_revision()
    return revision, sorted(inspect(conn).get_table_names())


async def test_migrations_match_the_table_classes(database_url: str) -> None:
    """
    ``migrate`` twice is a no-op the second time, and the result has no difference
    from the metadata: a table or column added without a migration fails here
    (generate one with ``alembic -c delivery/store/migrations/alembic.ini revision
    --autogenerate``).
    """
    await migrate(database_url)
    await migrate(database_url)
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            revision, tables = await conn.run_sync(_state)
            diff = await conn.run_sync(_diff)
    finally:
        await engine.dispose()
    assert revision == head_revision()
    assert set(metadata.tables) <= set(tables)
    assert diff == [], f"schema differs from the migrations: {diff}"
