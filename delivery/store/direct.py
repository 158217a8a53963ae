"""
SQLite hot paths run as one plain function on the driver's thread.

aiosqlite runs every cursor call on the connection's own thread and hands each
result back through the event loop, and SQLAlchemy processes every row and
parameter in Python on the loop's thread. In a burst that thread is the
bottleneck (the daemon ran at one core, the GIL, with the second core mostly
idle), so the dispatcher's reads and writes and the relay's stamps skip both:
a function gets the raw ``sqlite3`` connection on its thread, reads only the
columns it needs and binds prepared tuples with ``executemany``. Measured with
a 20k burst (``bench/bench_burst.py --count 20000``): with the rest of that
change, the daemon used 17.9 s of CPU instead of 20.7 s.

The rows read and written are those SQLAlchemy would: instants in its SQLite
text format (naive UTC, microseconds always present, so text order is time
order), booleans as 0/1. ``tests/store/test_direct.py`` checks both directions
against SQLAlchemy. PostgreSQL keeps the SQLAlchemy paths.

aiosqlite has no public way to run a function on its thread; ``_execute`` and
``_conn`` are what SQLAlchemy's own aiosqlite dialect uses.
"""

import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache, partial
from typing import Any

from sqlalchemy import Boolean, Table
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.store.engine import CLEAN_CHECKIN, joined_unit, writer_lock
from delivery.store.types import UTCDateTime

MAX_VARIABLES = 900
"""Parameters per ``IN (...)`` list; SQLite builds before 3.32 allow 999."""


def sqlite_instant(value: datetime) -> str:
    """An aware instant as SQLAlchemy stores it in SQLite (``UTCDateTime``)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return _sqlite_utc(value if value.tzinfo is UTC else value.astimezone(UTC))


@lru_cache(maxsize=1024)
def _sqlite_utc(value: datetime) -> str:
    """
    :func:`sqlite_instant` of an instant already in ``UTC``, cached: the rows of one
    write share a few instants (the batch's ``created_at``, a burst's fire minute), and
    a hit is ~15x cheaper than the conversion (it was 1.5% of a due-now burst's
    samples). Only UTC values are cached, as two local times that differ only in
    ``fold`` (the repeated hour of a DST fall-back) compare and hash equal while being
    an hour apart.
    """
    # isoformat is several times faster than strftime; timespec keeps the
    # microseconds when they are zero, as SQLAlchemy does.
    return value.replace(tzinfo=None).isoformat(" ", timespec="microseconds")


@lru_cache(maxsize=1024)
def parse_instant(text: str) -> datetime:
    """
    The aware UTC instant of a stored ``UTCDateTime`` text.

    Cached, as :func:`sqlite_instant` is: a batch's rows repeat a few instants, and
    a ``datetime`` is immutable, so sharing one is safe.
    """
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def _nullable(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


_CONVERTERS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "instant": (_nullable(parse_instant), _nullable(sqlite_instant)),
    "bool": (_nullable(bool), _nullable(int)),
}
"""Column kind -> (SQLite value to Python, Python value to SQLite); other kinds pass as is."""


@dataclass(frozen=True, slots=True)
class Codec:
    """A table's columns and how each converts between Python and SQLite."""

    table: str
    columns: tuple[str, ...]
    readers: tuple[Callable[[Any], Any] | None, ...]
    writers: tuple[Callable[[Any], Any] | None, ...]

    def row(self, values: Sequence[Any]) -> dict[str, Any]:
        """A fetched tuple (all columns, in order) as SQLAlchemy would map it."""
        return {
            name: value if convert is None else convert(value)
            for name, convert, value in zip(self.columns, self.readers, values, strict=True)
        }

    def only(self, columns: tuple[str, ...]) -> "Codec":
        """The codec of a subset of the columns (in that order)."""
        at = [self.columns.index(name) for name in columns]
        return Codec(
            self.table,
            columns,
            tuple(self.readers[i] for i in at),
            tuple(self.writers[i] for i in at),
        )

    def params(
        self, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]
    ) -> list[tuple[Any, ...]]:
        """The parameters of each row for ``columns``, converted for SQLite."""
        converting = tuple(
            (i, convert)
            for i, name in enumerate(columns)
            if (convert := self.writers[self.columns.index(name)]) is not None
        )
        return _converted(rows, columns, converting)


@cache
def codec(table: Table) -> Codec:
    """The (cached) codec of a SQLModel table."""
    kinds = []
    for column in table.c:
        if isinstance(column.type, UTCDateTime):
            kinds.append("instant")
        elif isinstance(column.type, Boolean):
            kinds.append("bool")
        else:
            kinds.append("plain")
    return Codec(
        table=table.name,
        columns=tuple(c.name for c in table.c),
        readers=tuple(_CONVERTERS[k][0] if k in _CONVERTERS else None for k in kinds),
        writers=tuple(_CONVERTERS[k][1] if k in _CONVERTERS else None for k in kinds),
    )


async def on_driver_thread[T](conn: AsyncConnection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """
    Run ``fn`` with the raw ``sqlite3`` connection behind ``conn``, on its thread.

    A ``sqlite3`` error is raised as the SQLAlchemy exception the same statement
    would have raised through SQLAlchemy (``sqlalchemy.exc.IntegrityError`` for a
    taken key, ...), so a store method's failures do not depend on its path.
    """
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    try:
        result: T = await driver._execute(fn, driver._conn)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
    return result


async def read[T](engine: AsyncEngine, fn: Callable[[sqlite3.Connection], T]) -> T:
    """
    Run ``fn`` (reads only) on a pooled connection's thread, or on the request's
    unit of work once it has written (so it reads the unit's own uncommitted writes).
    """
    unit = joined_unit(engine)
    if unit is not None and unit.began:
        return await on_driver_thread(await unit.connection(), fn)
    async with engine.connect() as conn:
        return await _alone(conn, fn)


async def _alone[T](conn: AsyncConnection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """
    ``fn`` on a connection checked out for it alone, which is then returned to the
    pool without the reset round trip when ``fn`` left no transaction open (the pool
    still rolls back one that did; see :data:`~delivery.store.engine.CLEAN_CHECKIN`).
    """
    raw = await conn.get_raw_connection()
    result, open_transaction = await on_driver_thread(conn, partial(_and_state, fn))
    if not open_transaction:
        raw.info[CLEAN_CHECKIN] = True
    return result


def _and_state[T](fn: Callable[[sqlite3.Connection], T], db: sqlite3.Connection) -> tuple[T, bool]:
    return fn(db), db.in_transaction


async def write[T](engine: AsyncEngine, fn: Callable[[sqlite3.Connection], T]) -> T:
    """
    Run ``fn`` in a write transaction on the driver's thread: the process's
    writer queue, then ``BEGIN IMMEDIATE``, ``fn`` and commit in ONE call to
    that thread; any exception rolls the whole transaction back and propagates.

    :func:`~delivery.store.engine.write_transaction` makes a round trip through
    the event loop for BEGIN, for each statement and for COMMIT, and holds the
    file's write lock across them. In a burst the loop is busy for tens of
    milliseconds at a time, so each round trip kept the writer idle and every
    other writer queued behind it; here the lock is held only while SQLite works.

    Inside a :func:`~delivery.store.engine.unit_of_work` (a request with an
    ``Idempotency-Key``), ``fn`` runs in a savepoint of the unit's transaction
    instead, still in one call to the thread, and commits only with the unit; an
    exception rolls back only ``fn``'s writes, as
    :func:`~delivery.store.engine.write_transaction` does there.
    """
    unit = joined_unit(engine)
    if unit is not None:
        return await on_driver_thread(await unit.connection(), partial(_in_savepoint, fn))
    lock = writer_lock(engine)
    await lock.acquire()
    held = True
    try:
        async with engine.connect() as conn:
            try:
                return await _alone(conn, partial(_in_transaction, fn))
            finally:
                # Before the pool resets the connection (another round trip).
                lock.release()
                held = False
    finally:
        if held:
            lock.release()


def _in_transaction[T](fn: Callable[[sqlite3.Connection], T], db: sqlite3.Connection) -> T:
    db.execute("BEGIN IMMEDIATE")
    try:
        result = fn(db)
    except BaseException:
        db.rollback()
        raise
    db.commit()
    return result


def _in_savepoint[T](fn: Callable[[sqlite3.Connection], T], db: sqlite3.Connection) -> T:
    db.execute("SAVEPOINT direct_write")
    try:
        result = fn(db)
    except BaseException:
        db.execute("ROLLBACK TO direct_write")
        db.execute("RELEASE direct_write")
        raise
    db.execute("RELEASE direct_write")
    return result


def marks(n: int) -> str:
    """``n`` positional placeholders, comma-separated: the inside of ``IN (...)``."""
    return ",".join("?" * n)


def _names(c: Codec, names: Iterable[str]) -> str:
    # Identifiers are interpolated (SQLite cannot bind them), so only the table's
    # own column names pass; values are always bound parameters.
    quoted = []
    for name in names:
        if name not in c.columns:
            raise ValueError(f"{c.table} has no column {name!r}")
        quoted.append(f'"{name}"')
    return ",".join(quoted)


def select_in(
    db: sqlite3.Connection,
    table: Table,
    column: str,
    values: Iterable[Any],
    *,
    columns: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """
    The rows of ``table`` whose ``column`` is one of ``values``, as mapped dicts
    of ``columns`` (default all: converting instants nobody reads was the
    largest cost of a dispatcher batch's reads).
    """
    wanted = sorted(set(values))
    found: list[dict[str, Any]] = []
    c = codec(table) if columns is None else codec(table).only(tuple(columns))
    names = _names(c, c.columns)
    where = _names(codec(table), [column])
    for start in range(0, len(wanted), MAX_VARIABLES):
        chunk = wanted[start : start + MAX_VARIABLES]
        cursor = db.execute(
            f'SELECT {names} FROM "{c.table}" WHERE {where} IN ({marks(len(chunk))})',  # noqa: S608
            chunk,
        )
        found.extend(c.row(values) for values in cursor.fetchall())
    return found


def select_where(
    db: sqlite3.Connection,
    table: Table,
    equals: Mapping[str, Any],
    *,
    columns: Sequence[str] | None = None,
    order_by: Sequence[str] = (),
    limit: int | None = None,
    after: tuple[str, datetime] | None = None,
) -> list[dict[str, Any]]:
    """
    The rows of ``table`` whose columns equal ``equals`` (``None`` means ``IS NULL``),
    ordered by ``order_by`` (ascending) and at most ``limit``, as mapped dicts of
    ``columns`` (default all). ``after`` (column, instant): only rows whose instant
    column is NULL or later than the instant.
    """
    names = tuple(equals)
    nulls = tuple(value is None for value in equals.values())
    c, sql, converting = _select_plan(
        table,
        names,
        nulls,
        None if columns is None else tuple(columns),
        tuple(order_by),
        None if after is None else after[0],
        limit is not None,
    )
    params: list[Any] = []
    for (name, null), convert in zip(zip(names, nulls, strict=True), converting, strict=True):
        if not null:
            value = equals[name]
            params.append(value if convert is None else convert(value))
    if after is not None:
        params.append(sqlite_instant(after[1]))
    if limit is not None:
        params.append(limit)
    return [c.row(values) for values in db.execute(sql, params).fetchall()]


@lru_cache(maxsize=512)
def _select_plan(
    table: Table,
    names: tuple[str, ...],
    nulls: tuple[bool, ...],
    columns: tuple[str, ...] | None,
    order_by: tuple[str, ...],
    after: str | None,
    limited: bool,
) -> tuple[Codec, str, tuple[Callable[[Any], Any] | None, ...]]:
    """
    :func:`select_where`'s codec of the rows read, its statement, and the converter
    of each ``equals`` column, for one shape of call (which columns are compared,
    which of them to NULL). Cached, as :func:`_insert_plan` is: the pair-clock
    check of every create POST is one of these.
    """
    full = codec(table)
    c = full if columns is None else full.only(columns)
    where = [f"{_names(full, [n])} = ?" for n, null in zip(names, nulls, strict=True) if not null]
    where += [f"{_names(full, [n])} IS NULL" for n, null in zip(names, nulls, strict=True) if null]
    if after is not None:
        name = _names(full, [after])
        where.append(f"({name} IS NULL OR {name} > ?)")
    sql = f'SELECT {_names(c, c.columns)} FROM "{c.table}"'  # noqa: S608
    if where:
        sql += " WHERE " + " AND ".join(where)
    if order_by:
        sql += " ORDER BY " + _names(full, order_by)
    if limited:
        sql += " LIMIT ?"
    converting = tuple(full.writers[full.columns.index(n)] for n in names)
    return c, sql, converting


def insert_rows(db: sqlite3.Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """
    Insert ``rows`` (the columns of the first row); a constraint violation raises
    ``sqlite3.IntegrityError``.
    """
    if not rows:
        return
    columns = tuple(rows[0])
    sql, converting = _insert_plan(table, columns, None)
    db.executemany(sql, _converted(rows, columns, converting))


@dataclass(frozen=True, slots=True)
class PreparedInsert:
    """
    An insert of rows whose parameters were converted on the caller's thread, so the
    driver's thread (holding the write lock) only runs the statement.
    """

    sql: str
    params: list[tuple[Any, ...]]

    def run(self, db: sqlite3.Connection) -> None:
        """Insert the rows; a constraint violation raises ``sqlite3.IntegrityError``."""
        if self.params:
            db.executemany(self.sql, self.params)


def prepare_insert(
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    unique: Sequence[str] | None = None,
) -> PreparedInsert:
    """
    :func:`insert_rows` of ``rows`` (the columns of the first row), or with ``unique``
    :func:`insert_ignoring_duplicates`, to run later on the driver's thread.
    """
    if not rows:
        return PreparedInsert("", [])
    columns = tuple(rows[0])
    sql, converting = _insert_plan(table, columns, None if unique is None else tuple(unique))
    return PreparedInsert(sql, _converted(rows, columns, converting))


def prepare_insert_rows(
    table: Table, columns: tuple[str, ...], rows: Iterable[Sequence[Any]]
) -> PreparedInsert:
    """
    :func:`prepare_insert` of rows given as values in ``columns`` order, without a
    dict per row (a fan-out batch records about two hundred).
    """
    sql, converting = _insert_plan(table, columns, None)
    return PreparedInsert(sql, _converted_values(rows, converting))


def insert_ignoring_duplicates(
    db: sqlite3.Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    unique: str | Sequence[str],
) -> int:
    """
    Insert ``rows`` (the columns of the first row), skipping any that collide on
    the ``unique`` column(s); how many were inserted.
    """
    if not rows:
        return 0
    columns = tuple(rows[0])
    sql, converting = _insert_plan(
        table, columns, (unique,) if isinstance(unique, str) else tuple(unique)
    )
    before = db.total_changes
    db.executemany(sql, _converted(rows, columns, converting))
    return db.total_changes - before


type _Converting = tuple[tuple[int, Callable[[Any], Any]], ...]


@lru_cache(maxsize=512)
def _insert_plan(
    table: Table, columns: tuple[str, ...], unique: tuple[str, ...] | None
) -> tuple[str, _Converting]:
    """
    The ``INSERT`` (``ON CONFLICT (unique) DO NOTHING`` with ``unique``) of
    ``columns`` into ``table``, and which of them convert (position, converter).

    Cached: a create POST's insert spent more time naming and checking its twenty
    columns and finding each one's converter than SQLite spent on the row.
    """
    c = codec(table)
    sql = f'INSERT INTO "{c.table}" ({_names(c, columns)}) VALUES ({marks(len(columns))})'  # noqa: S608
    if unique is not None:
        sql += f" ON CONFLICT ({_names(c, unique)}) DO NOTHING"
    converting = tuple(
        (i, convert)
        for i, name in enumerate(columns)
        if (convert := c.writers[c.columns.index(name)]) is not None
    )
    return sql, converting


def _converted(
    rows: Iterable[Mapping[str, Any]], columns: Sequence[str], converting: _Converting
) -> list[tuple[Any, ...]]:
    """The parameters of each row for ``columns``, converted for SQLite (:meth:`Codec.params`)."""
    return [_convert([row[name] for name in columns], converting) for row in rows]


def _converted_values(
    rows: Iterable[Sequence[Any]], converting: _Converting
) -> list[tuple[Any, ...]]:
    """Each row's values (in the plan's column order), converted for SQLite."""
    return [_convert(list(row), converting) for row in rows]


def _convert(values: list[Any], converting: _Converting) -> tuple[Any, ...]:
    """``values`` (a fresh list, changed in place) with its converting columns converted."""
    for i, convert in converting:
        values[i] = convert(values[i])
    return tuple(values)


def update_in(
    db: sqlite3.Connection,
    table: Table,
    column: str,
    values: Sequence[Any],
    changes: Mapping[str, Any],
    *,
    only_if: Mapping[str, Any] | None = None,
) -> list[Any]:
    """
    ``UPDATE table SET changes WHERE column IN values [AND only_if]``.

    Returns:
        The ``column`` value of every row changed.
    """
    c = codec(table)
    conditions = dict(only_if or {})
    assignments = ", ".join(f"{_names(c, [n])} = ?" for n in changes)
    where = _names(c, [column])
    extra = "".join(f" AND {_names(c, [n])} = ?" for n in conditions)
    [params] = c.params([changes], list(changes))
    [checks] = c.params([conditions], list(conditions))
    changed: list[Any] = []
    for start in range(0, len(values), MAX_VARIABLES):
        chunk = list(values[start : start + MAX_VARIABLES])
        cursor = db.execute(
            f'UPDATE "{c.table}" SET {assignments} '  # noqa: S608
            f"WHERE {where} IN ({marks(len(chunk))}){extra} RETURNING {where}",
            (*params, *chunk, *checks),
        )
        changed.extend(row[0] for row in cursor.fetchall())
    return changed


def delete_in(
    db: sqlite3.Connection,
    table: Table,
    column: str,
    values: Sequence[Any],
    *,
    only_if: Mapping[str, Any] | None = None,
) -> int:
    """
    ``DELETE FROM table WHERE column IN values [AND only_if]``; a ``None`` in
    ``only_if`` means ``IS NULL``.

    Returns:
        The rows deleted.
    """
    c = codec(table)
    conditions = {k: v for k, v in (only_if or {}).items() if v is not None}
    nulls = [k for k, v in (only_if or {}).items() if v is None]
    where = _names(c, [column])
    extra = "".join(f" AND {_names(c, [n])} = ?" for n in conditions)
    extra += "".join(f" AND {_names(c, [n])} IS NULL" for n in nulls)
    [checks] = c.params([conditions], list(conditions))
    deleted = 0
    for start in range(0, len(values), MAX_VARIABLES):
        chunk = list(values[start : start + MAX_VARIABLES])
        cursor = db.execute(
            f'DELETE FROM "{c.table}" WHERE {where} IN ({marks(len(chunk))}){extra}',  # noqa: S608
            (*chunk, *checks),
        )
        deleted += cursor.rowcount
    return deleted


def update_rows(
    db: sqlite3.Connection, table: Table, rows: Sequence[Mapping[str, Any]], *, where: Sequence[str]
) -> int:
    """
    One ``UPDATE`` per row (``executemany``): the row's ``where`` columns pick the
    row, its other columns are the new values. The rows changed.
    """
    if not rows:
        return 0
    c = codec(table)
    sets = [name for name in rows[0] if name not in where]
    assignments = ", ".join(f"{_names(c, [n])} = ?" for n in sets)
    conditions = " AND ".join(f"{_names(c, [n])} = ?" for n in where)
    before = db.total_changes
    db.executemany(
        f'UPDATE "{c.table}" SET {assignments} WHERE {conditions}',  # noqa: S608
        c.params(rows, [*sets, *where]),
    )
    return db.total_changes - before
