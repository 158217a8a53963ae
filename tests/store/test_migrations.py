"""The Alembic migrations build exactly the schema the table classes declare, on both databases."""

import asyncio
import subprocess
import sys
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from delivery.store.engine import create_engine
from delivery.store.migrate import (
    alembic_config,
    head_revision,
    migrate,
    shipped_head,
    stored_revision,
)
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


async def test_an_up_to_date_database_is_checked_without_loading_alembic(
    database_url: str,
) -> None:
    """
    The start-up fast path reads the stored revision and compares it with the head
    parsed from the scripts; that head is Alembic's, and a database behind it (or
    without a schema) is upgraded, not skipped.
    """
    assert shipped_head() == head_revision()
    engine = create_engine(database_url)
    try:
        assert await stored_revision(engine) is None
        await migrate(database_url, revision=previous_revision())
        assert await stored_revision(engine) == previous_revision()
        await migrate(database_url)
        assert await stored_revision(engine) == shipped_head()
    finally:
        await engine.dispose()

    # A fresh interpreter that migrates an up-to-date database never imports Alembic.
    probe = (
        "import asyncio, sys\n"
        "from delivery.store.migrate import migrate\n"
        f"asyncio.run(migrate({database_url!r}))\n"
        "print(sorted(m for m in ('alembic', 'mako') if m in sys.modules))\n"
    )
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def previous_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config()).get_revision(head_revision())
    assert script is not None
    assert isinstance(script.down_revision, str)
    return script.down_revision
