"""
What every store shares: its connections, the owner filter and insert-ignoring-duplicates.

Each aggregate's store (keys, schedules, wakeups, events, inventory,
notifications, idempotency, webhooks, channels) subclasses :class:`StoreBase`
for its read and write connections, writes tenancy with :func:`owned`, and
inserts idempotently with :func:`insert_ignoring_duplicates`, so these three
rules are written once.
"""

import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import ColumnElement, Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from delivery import jsontext
from delivery.store.engine import Capabilities, Engine, read_connection, write_transaction


def new_id(prefix: str) -> str:
    """A random prefixed id (``sch_3f9a...``): 96 bits, so collisions are not a concern."""
    return f"{prefix}_{secrets.token_hex(12)}"


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys: the stored and echoed form."""
    return jsontext.canonical(value)


def owned(
    table: Table,
    project_id: str,
    *,
    agent_id: str | None = None,
    user_id: str | None = None,
    id: str | None = None,
) -> list[ColumnElement[bool]]:
    """
    The conditions that keep a statement inside one tenant: the project always,
    then the agent, the user and the row id when given.

    Every read and write of tenant data filters with this, so a foreign id
    behaves exactly like an unknown one (a 404, never another project's row).
    """
    c = table.c
    conds: list[ColumnElement[bool]] = [c.project_id == project_id]
    if agent_id is not None:
        conds.append(c.agent_id == agent_id)
    if user_id is not None:
        conds.append(c.user_id == user_id)
    if id is not None:
        conds.append(c.id == id)
    return conds


def owned_values(
    project_id: str, *, agent_id: str | None = None, user_id: str | None = None
) -> dict[str, str]:
    """
    :func:`owned` as column values, for the steps of :mod:`delivery.store.steps`
    (``SelectWhere``): the same tenant filter, the project always.
    """
    values = {"project_id": project_id}
    if agent_id is not None:
        values["agent_id"] = agent_id
    if user_id is not None:
        values["user_id"] = user_id
    return values


def insert_ignoring(dialect: str, table: Table, unique: Sequence[str]) -> Any:
    """
    ``INSERT ... ON CONFLICT (unique) DO NOTHING`` on ``table`` in ``dialect``.

    Both databases spell it the same way, but SQLAlchemy builds it only from the
    dialect's own ``insert``; hot paths build the statement once and keep it.
    """
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    return insert(table).on_conflict_do_nothing(index_elements=list(unique))


async def insert_ignoring_duplicates(
    conn: AsyncConnection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    unique: Sequence[str],
) -> int:
    """
    Insert ``rows``, silently skipping any that collide on the ``unique`` columns.

    Runs in the caller's transaction.

    Returns:
        How many rows were actually inserted (duplicates excluded).
    """
    if not rows:
        return 0
    stmt = insert_ignoring(conn.dialect.name, table, unique)
    # rowcount is -1 for a multi-row executemany on asyncpg, so count what
    # RETURNING hands back instead: conflicting rows return nothing. SQLAlchemy
    # batches this into multi-VALUES statements ("insertmanyvalues") on both drivers.
    key = table.c[unique[0]]
    result = await conn.execute(stmt.returning(key), [dict(r) for r in rows])
    return len(result.all())


class StoreBase:
    """
    The connections of a store over one engine; the engine's owner disposes of it.

    Args:
        engine: from :func:`delivery.store.engine.create_engine`, schema present.
        autocommit_reads: every :meth:`read` block runs one statement, so on
            PostgreSQL it may skip BEGIN and ROLLBACK (two round trips that cost
            more than the query on the polling path). A store whose read blocks
            run several statements that must agree passes False. pysqlite never
            opens a transaction for a SELECT anyway.

    Attributes:
        capabilities: what the database can do, decided once (as every store asks).
        single_writer: True on SQLite, where one process writes the file: a
            claim left at start-up is stale, and nothing is skipped while locked.
    """

    def __init__(self, engine: Engine, *, autocommit_reads: bool = True) -> None:
        self.engine = engine
        self.capabilities = Capabilities.of(engine)
        self.single_writer = self.capabilities.single_writer
        self._reader = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if autocommit_reads and not self.single_writer
            else engine
        )

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """
        One write transaction: committed when the block exits, rolled back on error.

        On SQLite the write lock is taken at BEGIN, so concurrent writers queue
        on ``busy_timeout`` instead of failing with SQLITE_BUSY when a deferred
        transaction upgrades from read to write. Inside a unit of work the block
        joins it (:func:`delivery.store.engine.write_transaction`).
        """
        async with write_transaction(self.engine) as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """
        A connection for single-statement reads (autocommit on PostgreSQL: each
        statement sees its own snapshot, so never use it for read-then-write).
        """
        async with read_connection(self._reader) as conn:
            yield conn
