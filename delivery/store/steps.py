"""
A store operation written once, run on either path: SQLite's driver thread or SQLAlchemy Core.

The dispatcher's reads and writes are set-based (``WHERE id IN (...)``,
``INSERT ... ON CONFLICT DO NOTHING``). On SQLite they run as one plain function
on the driver's thread (:mod:`delivery.store.direct`: no event-loop round trip
per statement, the burst's bottleneck); on PostgreSQL they are Core statements
on an async connection. Written twice, the two versions of an operation drift
apart. So an operation is a generator that yields :data:`Step` values (what to
select, update, delete or insert) and receives each one's result; it decides
what comes next from the results and returns the operation's value.
:func:`run_direct` runs it on a raw ``sqlite3`` connection and :func:`run_core`
on an ``AsyncConnection``; a store picks one per engine, once, and its callers
never know which. The steps are those the SQLite fast path already used, so
both runners produce the same rows (``tests/store/test_direct.py`` checks the
SQLite conversions against SQLAlchemy, ``tests/store/test_steps.py`` the runners
against each other).

An operation holds no connection and does no I/O itself: it is built from
values and can be run in a transaction of its own or inside a caller's.
"""

import sqlite3
from collections.abc import Awaitable, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, Table, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.store import common, direct
from delivery.store.engine import read_connection, write_transaction


@dataclass(frozen=True, slots=True)
class SelectIn:
    """
    The rows of ``table`` whose ``column`` is one of ``values`` (order not kept).

    Result: ``list[dict[str, Any]]`` of ``columns`` (default: every column).
    """

    table: Table
    column: str
    values: Sequence[Any]
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class UpdateIn:
    """
    ``UPDATE table SET changes WHERE column IN values AND only_if`` (each ``=``;
    ``only_if`` values are never ``None``).

    Result: ``list[Any]``, the ``column`` value of every row changed.
    """

    table: Table
    column: str
    values: Sequence[Any]
    changes: Mapping[str, Any]
    only_if: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeleteIn:
    """
    ``DELETE FROM table WHERE column IN values AND only_if`` (``None`` means ``IS NULL``).

    Result: ``int``, the rows deleted.
    """

    table: Table
    column: str
    values: Sequence[Any]
    only_if: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InsertIgnoring:
    """
    Insert ``rows`` (the columns of the first row), skipping any that collide on ``unique``.

    Result: ``int``, the rows inserted.
    """

    table: Table
    rows: Sequence[Mapping[str, Any]]
    unique: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class InsertRows:
    """
    Insert ``rows`` (the columns of the first row); a constraint violation raises.

    Result: ``None``.
    """

    table: Table
    rows: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class SelectWhere:
    """
    The rows of ``table`` whose columns equal ``equals`` (``None`` means ``IS NULL``),
    ordered by ``order_by`` (ascending), at most ``limit``; with ``after`` (an
    instant column and an instant), only rows whose column is NULL or later.

    Result: ``list[dict[str, Any]]`` of ``columns`` (default: every column).
    """

    table: Table
    equals: Mapping[str, Any]
    columns: tuple[str, ...] | None = None
    order_by: tuple[str, ...] = ()
    limit: int | None = None
    after: tuple[str, datetime] | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """
    A step the set-based ones cannot say (a row lock, a grouped count), written for
    both paths: ``direct`` on the raw ``sqlite3`` connection, ``core`` on the async
    connection. Both must return the same value.

    Result: what the function returns.
    """

    direct: Callable[[sqlite3.Connection], Any]
    core: Callable[[AsyncConnection], Awaitable[Any]]


type Step = SelectIn | UpdateIn | DeleteIn | InsertIgnoring | InsertRows | SelectWhere | Call
type Steps[T] = Generator[Step, Any, T]
"""An operation: yields steps, is sent each step's result, returns its value."""


def inserting(*steps: InsertRows | InsertIgnoring) -> Steps[None]:
    """An operation that runs ``steps`` (inserts) in order and returns nothing."""
    # Not ``yield from``: the runner sends each step's result, which a tuple refuses.
    for step in steps:  # noqa: UP028
        yield step


def selecting(step: SelectWhere) -> Steps[list[dict[str, Any]]]:
    """An operation that runs one ``SelectWhere`` and returns its rows."""
    rows: list[dict[str, Any]] = yield step
    return rows


class Runner:
    """
    Runs operations on one engine by the fastest path it has, decided once here.

    With aiosqlite, an operation runs whole on the driver's thread
    (:func:`delivery.store.direct.read` / :func:`~delivery.store.direct.write`:
    one call to that thread, the write lock held only while SQLite works);
    otherwise as Core statements on a pooled connection. Inside a request's
    unit of work both paths join the unit's transaction (a write is a savepoint
    of it, a read after its first write reads its uncommitted state), as
    :func:`~delivery.store.engine.write_transaction` does.

    Args:
        engine: the engine written on.
        reader: the engine Core reads run on (default ``engine``); a store may
            pass an autocommit one, as every read here is one statement per step.
    """

    def __init__(self, engine: AsyncEngine, *, reader: AsyncEngine | None = None) -> None:
        self.engine = engine
        self.reader = reader or engine
        dialect = engine.dialect
        self.driver_thread = dialect.name == "sqlite" and dialect.driver == "aiosqlite"

    async def read[T](self, steps: Steps[T]) -> T:
        """Run ``steps`` (selects only) on a pooled connection, or the unit's once it wrote."""
        if self.driver_thread:
            return await direct.read(self.engine, partial(run_direct, steps))
        async with read_connection(self.reader) as conn:
            return await run_core(steps, conn)

    async def write[T](self, steps: Steps[T]) -> T:
        """Run ``steps`` in one write transaction: all of it commits, or none (it raised)."""
        if self.driver_thread:
            return await direct.write(self.engine, partial(run_direct, steps))
        async with write_transaction(self.engine) as conn:
            return await run_core(steps, conn)


def run_direct[T](steps: Steps[T], db: sqlite3.Connection) -> T:
    """Run ``steps`` on the raw ``sqlite3`` connection (call on its driver thread)."""
    result: Any = None
    try:
        while True:
            result = _direct_step(db, steps.send(result))
    except StopIteration as done:
        value: T = done.value
        return value


async def run_core[T](steps: Steps[T], conn: AsyncConnection) -> T:
    """Run ``steps`` as SQLAlchemy Core statements on ``conn``, in its transaction."""
    result: Any = None
    try:
        while True:
            result = await _core_step(conn, steps.send(result))
    except StopIteration as done:
        value: T = done.value
        return value


def _direct_step(db: sqlite3.Connection, step: Step) -> Any:
    match step:
        case SelectIn(table, column, values, columns):
            return direct.select_in(db, table, column, values, columns=columns)
        case UpdateIn(table, column, values, changes, only_if):
            return direct.update_in(db, table, column, values, changes, only_if=only_if)
        case DeleteIn(table, column, values, only_if):
            return direct.delete_in(db, table, column, values, only_if=only_if)
        case InsertIgnoring(table, rows, unique):
            return direct.insert_ignoring_duplicates(db, table, rows, unique=unique)
        case InsertRows(table, rows):
            return direct.insert_rows(db, table, rows)
        case SelectWhere(table, equals, columns, order_by, limit, after):
            return direct.select_where(
                db, table, equals, columns=columns, order_by=order_by, limit=limit, after=after
            )
        case Call(fn, _):
            return fn(db)


def _where(
    table: Table, column: str, values: Sequence[Any], only_if: Mapping[str, Any]
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [table.c[column].in_(values)]
    # ``== None`` compiles to IS NULL.
    conditions += [table.c[name] == value for name, value in only_if.items()]
    return conditions


async def _core_step(conn: AsyncConnection, step: Step) -> Any:
    match step:
        case SelectIn(table, column, values, columns):
            wanted = sorted(set(values))
            if not wanted:
                return []
            picked = table.c if columns is None else [table.c[name] for name in columns]
            result = await conn.execute(select(*picked).where(table.c[column].in_(wanted)))
            return [dict(row) for row in result.mappings()]
        case UpdateIn(table, column, values, changes, only_if):
            if not values:
                return []
            updating = (
                update(table)
                .where(*_where(table, column, values, only_if))
                .values(dict(changes))
                .returning(table.c[column])
            )
            return list((await conn.execute(updating)).scalars())
        case DeleteIn(table, column, values, only_if):
            if not values:
                return 0
            deleting = delete(table).where(*_where(table, column, values, only_if))
            return int((await conn.execute(deleting)).rowcount or 0)
        case InsertIgnoring(table, rows, unique):
            return await common.insert_ignoring_duplicates(conn, table, rows, unique=unique)
        case InsertRows(table, rows):
            if rows:
                await conn.execute(insert(table), [dict(r) for r in rows])
            return None
        case SelectWhere(table, equals, columns, order_by, limit, after):
            picked = table.c if columns is None else [table.c[name] for name in columns]
            selecting = (
                select(*picked)
                # ``== None`` compiles to IS NULL.
                .where(*(table.c[name] == value for name, value in equals.items()))
                .order_by(*(table.c[name] for name in order_by))
                .limit(limit)
            )
            if after is not None:
                bound = table.c[after[0]]
                selecting = selecting.where(or_(bound.is_(None), bound > after[1]))
            return [dict(row) for row in (await conn.execute(selecting)).mappings()]
        case Call(_, fn):
            return await fn(conn)
