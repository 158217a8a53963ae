"""
Alembic environment for both databases.

Run from the application, :func:`delivery.store.migrate.migrate` hands in an
open connection (``config.attributes["connection"]``) so migrations run inside
the caller's transaction and event loop. Run from the ``alembic`` command line,
it opens its own async engine on ``DELIVERY_DATABASE_URL`` (or the ini's URL).
SQLite gets batch mode because it cannot ALTER most things in place.
"""

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from delivery.store.engine import create_engine
from delivery.store.tables import metadata

config = context.config
target_metadata = metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def _offline() -> None:
    context.configure(
        url=os.environ.get("DELIVERY_DATABASE_URL") or config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _offline()
else:
    given = config.attributes.get("connection")
    if given is not None:
        _run(given)
    else:
        url = os.environ.get("DELIVERY_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
        asyncio.run(_run_async(str(url)))
