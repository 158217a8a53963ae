"""
The async engine for SQLite (embedded default) and PostgreSQL (production).

SQLite is tuned for one writer with concurrent readers: WAL, a busy timeout so
short write contention waits instead of failing, and foreign keys on. A SQLite file
this engine creates is readable by its owner only (see :func:`create_engine`).
"""

import asyncio
import socket
import sqlite3
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import Select, Table, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from delivery.datadir import create_private_file

_log = structlog.get_logger(__name__)

SQLITE_STATEMENT_CACHE = 8
"""
Prepared statements kept per SQLite connection (Python's default is 128). Bulk
statements whose text varies with the row count filled the cache with large
prepared statements. In a 100k burst with 1M stored (``bench/bench_rss.py``) the
daemon peaked at 235 MB with the default and 195 MB with 32, while its writes
went through SQLAlchemy. With the hot paths on ``delivery.store.direct``, it
peaked at 162 MB with 32 and 153 MB with 8, and the burst was not slower with 8
(all notified within 79 s, against 109 s with 32).
"""


SQLITE_POOL_SIZE = 15
"""
SQLite connections per engine, all kept once opened. The pool's default (5 kept,
10 more opened past them and closed on return) had the same bound, but under 64
concurrent requests it closed and reopened connections all the time (each open: an
aiosqlite thread, the file and six PRAGMAs): 593 opens for 6400 reads, at
0.78 ms of CPU per read against 0.11 ms without the pool (64 concurrent tasks of 100
queue reads each; ``tests/store/test_engine_pool.py`` holds the kept connections to
this bound). A kept connection costs an idle thread and its page cache.
"""


Engine = AsyncEngine
"""
The store's handle on one database. Processes hold it and hand it to store
constructors; only the store runs statements on it.
"""


def is_sqlite(url: str) -> bool:
    """True for any ``sqlite`` URL, whatever the driver."""
    return url.startswith("sqlite")


@dataclass(frozen=True, slots=True)
class Capabilities:
    """
    What the database behind an engine can do, decided once when a store is built.

    A store method takes the faster form where a flag allows it and the portable
    form otherwise, inside the same method, so neither the method's callers nor
    its later calls ask which database they run on (APScheduler 4's
    ``SQLAlchemyDataStore`` keeps ``_supports_update_returning`` the same way).

    Attributes:
        dialect: SQLAlchemy's dialect name (``sqlite``, ``postgresql``).
        driver_thread: functions can run on the raw ``sqlite3`` connection on
            aiosqlite's thread (:mod:`delivery.store.direct`), so a whole write
            transaction is one call to that thread.
        skip_locked: ``SELECT ... FOR UPDATE SKIP LOCKED`` exists, so replicas
            claiming rows skip each other's instead of queueing on them. Without
            it (SQLite) the file has one writer and there is nothing to skip.
        single_writer: one process writes the database (a SQLite file), so a
            claim or lease found at start-up belongs to a killed process and
            can be released at once.
    """

    dialect: str
    driver_thread: bool
    skip_locked: bool
    single_writer: bool

    @classmethod
    def of(cls, engine: AsyncEngine) -> "Capabilities":
        """The capabilities of ``engine``'s database and driver."""
        dialect = engine.dialect
        return cls(
            dialect=dialect.name,
            driver_thread=dialect.name == "sqlite" and dialect.driver == "aiosqlite",
            skip_locked=dialect.name == "postgresql",
            single_writer=dialect.name == "sqlite",
        )

    def insert(self, table: Table) -> Any:
        """The dialect's ``INSERT`` for ``table``, which has ``ON CONFLICT`` clauses."""
        return pg_insert(table) if self.dialect == "postgresql" else sqlite_insert(table)


class UnsupportedDatabaseError(ValueError):
    """A database URL of a kind this service does not run on."""


def describe_database_error(exc: BaseException) -> str | None:
    """
    One line for a database failure met at start-up (unreachable, refused login,
    missing database, unusable URL or file), or ``None`` if ``exc`` is not one.

    Drivers' exceptions are told apart by module and name rather than imported, so
    a deployment without a driver installed does not fail here.
    """
    kind = type(exc)
    name, module = kind.__name__, kind.__module__
    if isinstance(exc, UnsupportedDatabaseError):
        return f"{exc}; DELIVERY_DATABASE_URL must be sqlite+aiosqlite:// or postgresql+asyncpg://"
    if module.startswith("sqlalchemy") and name in {"ArgumentError", "NoSuchModuleError"}:
        return f"DELIVERY_DATABASE_URL is not a usable database URL ({exc})"
    if module.startswith("asyncpg"):
        if name == "InvalidCatalogNameError":
            return f"the PostgreSQL database does not exist ({exc}); create it first"
        if name in {"InvalidPasswordError", "InvalidAuthorizationSpecificationError"}:
            return f"PostgreSQL refused the login ({exc}); check DELIVERY_DATABASE_URL"
    if module == "sqlite3" and name == "OperationalError" and "unable to open" in str(exc):
        return f"cannot open the SQLite database ({exc}); check the folder exists and is writable"
    if isinstance(exc, ConnectionRefusedError | ConnectionResetError) or (
        isinstance(exc, OSError) and "Connect call failed" in str(exc)
    ):
        return f"cannot reach the database ({exc}); check DELIVERY_DATABASE_URL and that it runs"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the database host ({exc}); check DELIVERY_DATABASE_URL"
    return None


_UNAVAILABLE = frozenset(
    {
        # asyncpg: the server closed the connection, is shutting down or starting up.
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "AdminShutdownError",
        "CannotConnectNowError",
        "CrashShutdownError",
        "TooManyConnectionsError",
        "InterfaceError",
    }
)


def is_database_unavailable(exc: BaseException) -> bool:
    """
    Whether ``exc`` says the database went away under a request (a restart, a
    failover, a terminated backend) rather than that the request was wrong: worth
    a 503 and a retry, not a 500. The pool's pre-ping replaces such a connection
    at its next checkout.
    """
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if (
            type(current).__module__.startswith("asyncpg")
            and type(current).__name__ in _UNAVAILABLE
        ):
            return True
        if isinstance(current, ConnectionError):
            return True
        current = current.__cause__
    return False


_LOCK_CONFLICTS = frozenset(
    {
        # asyncpg: a deadlock broken by the server, lock_timeout, a serialization failure.
        "DeadlockDetectedError",
        "LockNotAvailableError",
        "SerializationError",
    }
)
_SQLITE_LOCK_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def is_lock_conflict(exc: BaseException) -> bool:
    """
    Whether ``exc`` says a write lost to another's lock rather than that it was wrong:
    SQLite's write lock stayed taken past ``busy_timeout`` ("database is locked"), or
    PostgreSQL broke a deadlock, hit a lock timeout or a serialization failure. The
    same transaction, tried again a little later, may commit whole.
    """
    seen: list[BaseException] = [exc]
    while seen:
        current = seen.pop()
        if isinstance(current, sqlite3.Error):
            # Extended codes (SQLITE_BUSY_SNAPSHOT, ...) carry the primary in the low byte.
            if getattr(current, "sqlite_errorcode", 0) & 0xFF in _SQLITE_LOCK_CODES:
                return True
        elif (
            type(current).__module__.startswith("asyncpg")
            and type(current).__name__ in _LOCK_CONFLICTS
        ):
            return True
        if current.__cause__ is not None:
            seen.append(current.__cause__)
        orig = getattr(current, "orig", None) if isinstance(current, DBAPIError) else None
        if isinstance(orig, BaseException) and orig is not current.__cause__:
            seen.append(orig)
    return False


def is_row_refused(exc: BaseException) -> bool:
    """
    Whether ``exc`` says the database refused a row of the write (a taken key, a
    missing reference, a value that does not fit: an integrity or data error), so
    the same rows written apart would let the others commit.
    """
    return isinstance(exc, IntegrityError | DataError)


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    """
    Build the async engine for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).

    A SQLite database file that does not exist yet is created empty with mode 0600
    just before each connection opens it, instead of by SQLite with 0644 (less the
    umask): it holds every tenant's data, and SQLite gives ``-wal`` and ``-shm`` the
    mode of their database file, so they are private too (``delivery.datadir``).

    Raises:
        UnsupportedDatabaseError: for a URL of another database.
    """
    if is_sqlite(url):
        path = _sqlite_file(url)
        # A file's queue pool keeps its connections; an in-memory database has a pool
        # of one connection that takes no sizes.
        sizes = {"pool_size": SQLITE_POOL_SIZE, "max_overflow": 0} if path is not None else {}
        engine = create_async_engine(
            url,
            echo=echo,
            connect_args={"timeout": 30, "cached_statements": SQLITE_STATEMENT_CACHE},
            **sizes,
            # _reset_unless_clean does the pool's rollback-on-return itself, so that it
            # can skip it for a connection known to hold no transaction.
            pool_reset_on_return=None,
        )
        if path is not None:
            event.listen(engine.sync_engine, "do_connect", _private_file_creator(path))
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine.pool, "reset", _reset_unless_clean)
        event.listen(engine.sync_engine.pool, "checkout", _forget_clean)
        return engine
    if url.startswith("postgresql"):
        return create_async_engine(
            url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
    raise UnsupportedDatabaseError(f"unsupported database URL scheme: {url.split(':', 1)[0]!r}")


_WRITERS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]]" = (
    weakref.WeakKeyDictionary()
)


_URL_TEXTS: dict[int, tuple["weakref.ref[AsyncEngine]", str]] = {}


def url_text(engine: AsyncEngine) -> str:
    """
    ``str(engine.url)``, made once per engine: rendering a URL quotes each part
    anew, and every write asked for it (its writer lock, its unit of work) up to
    three times, ~2% of a keyed create POST's server CPU. Keyed by ``id`` with a
    weak reference to tell a later engine at the same address apart (a
    ``WeakKeyDictionary`` lookup makes a reference each time, and costs most of
    what it saves).
    """
    held = _URL_TEXTS.get(id(engine))
    if held is not None and held[0]() is engine:
        return held[1]
    text = str(engine.url)
    key = id(engine)
    _URL_TEXTS[key] = (weakref.ref(engine, lambda _: _URL_TEXTS.pop(key, None)), text)
    return text


def writer_lock(engine: AsyncEngine) -> asyncio.Lock:
    """
    The lock this process's writers of ``engine``'s SQLite file queue on (see
    :func:`write_transaction`); one per file per event loop, as an
    ``asyncio.Lock`` belongs to one loop.
    """
    url = url_text(engine)
    locks = _WRITERS.setdefault(asyncio.get_running_loop(), {})
    lock = locks.get(url)
    if lock is None:
        lock = locks[url] = asyncio.Lock()
    return lock


async def begin_immediate(conn: AsyncConnection) -> None:
    """
    Begin ``conn``'s transaction on SQLite with ``BEGIN IMMEDIATE`` (the write lock).

    With aiosqlite the statement goes to the driver's thread in one call:
    ``exec_driver_sql`` took three (cursor, execute, close) plus SQLAlchemy's
    per-statement work, about 100 µs of CPU more per transaction on a shared
    2-core machine (``bench/bench_api_cost.py`` for the requests that pay it).
    SQLAlchemy's own begin emits nothing on SQLite; it records that a transaction
    is open, so that
    ``commit`` and ``rollback`` act on it as they did after ``exec_driver_sql``.
    A ``sqlite3`` error is raised as SQLAlchemy's (``OperationalError`` when the
    lock stays busy past the timeout), as before.
    """
    if conn.dialect.driver != "aiosqlite":
        await conn.exec_driver_sql("BEGIN IMMEDIATE")
        return
    await conn.begin()
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    try:
        await driver._execute(driver._conn.execute, "BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc


class UnitOfWork:
    """
    One transaction that every write on one engine, in one task, joins until the
    owner commits it: the request transaction behind ``Idempotency-Key``.

    A route's writes and the record of its answer must commit together, or a
    crash between them leaves a written resource without a recorded answer (a
    retry writes it twice) or a recorded key without its resource. Routes and
    store methods keep opening :func:`write_transaction` as usual; inside
    :func:`unit_of_work` those blocks become savepoints of this one transaction
    (an error rolls back only its own block, as its own transaction would have),
    and reads through :func:`read_connection` see the uncommitted writes.

    The transaction begins lazily at the first write, so a request takes the
    SQLite write lock only from its first write to its end. Only the task that
    opened the unit joins it: a task started inside the request (which inherits
    the context) writes on its own, as it would outside one. Work that must not
    happen before the commit (waking the daemon, starting a background job) is
    deferred with :func:`after_commit`.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._url = url_text(engine)
        self._owner = asyncio.current_task()
        self._conn: AsyncConnection | None = None
        self._lock: asyncio.Lock | None = None
        self._after_commit: list[Callable[[], None]] = []
        self._open = True

    @property
    def is_open(self) -> bool:
        """Whether the unit has neither committed nor rolled back yet."""
        return self._open

    def joins(self, engine: AsyncEngine) -> bool:
        """Whether a write on ``engine`` in the current task belongs to this unit."""
        return (
            self._open
            and asyncio.current_task() is self._owner
            and (engine is self.engine or url_text(engine) == self._url)
        )

    @property
    def began(self) -> bool:
        """Whether a write has opened the transaction."""
        return self._conn is not None

    async def connection(self) -> AsyncConnection:
        """The unit's connection, beginning the transaction on first use."""
        if self._conn is None:
            if is_sqlite(self._url):
                lock = writer_lock(self.engine)
                await lock.acquire()
                self._lock = lock
            try:
                conn = await self.engine.connect()
                if self._lock is not None:
                    await begin_immediate(conn)
                else:
                    await conn.begin()
            except BaseException:
                self._release_lock()
                raise
            self._conn = conn
        return self._conn

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the unit has committed; dropped if it rolls back."""
        self._after_commit.append(callback)

    async def commit(self) -> None:
        """Commit the writes, then run the deferred callbacks (their faults are logged)."""
        if self._conn is not None:
            await self._conn.commit()  # on failure the owner's block rolls back
        await self._close()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            try:
                callback()
            except Exception as exc:  # the write is durable; a callback fault must not undo that
                _log.warning("after-commit callback failed", error=repr(exc))

    async def rollback(self) -> None:
        """Roll back every write of the unit and drop the deferred callbacks."""
        self._after_commit.clear()
        try:
            if self._conn is not None:
                await self._conn.rollback()
        finally:
            await self._close()

    async def _close(self) -> None:
        self._open = False
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                await conn.close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()


_UNIT: ContextVar[UnitOfWork | None] = ContextVar("delivery_unit_of_work", default=None)


@asynccontextmanager
async def unit_of_work(engine: AsyncEngine) -> AsyncIterator[UnitOfWork]:
    """
    Make every write on ``engine`` in this task one transaction until the
    caller commits it (:class:`UnitOfWork`); whatever is not committed when the
    block ends, by an exception included, is rolled back.
    """
    unit = UnitOfWork(engine)
    token = _UNIT.set(unit)
    try:
        yield unit
    finally:
        _UNIT.reset(token)
        if unit.is_open:
            await unit.rollback()


def _joined(engine: AsyncEngine) -> UnitOfWork | None:
    unit = _UNIT.get()
    return unit if unit is not None and unit.joins(engine) else None


def joined_unit(engine: AsyncEngine) -> UnitOfWork | None:
    """
    The :func:`unit_of_work` a write on ``engine`` in this task belongs to, if any
    (for writers that run outside :func:`write_transaction`, such as
    :mod:`delivery.store.direct`).
    """
    return _joined(engine)


def after_commit(engine: AsyncEngine, callback: Callable[[], None]) -> None:
    """
    Run ``callback`` once the current writes on ``engine`` are durable: at once
    outside a :func:`unit_of_work`, after its commit inside one.
    """
    unit = _joined(engine)
    if unit is None:
        callback()
    else:
        unit.after_commit(callback)


@contextmanager
def alone_unless_begun(engine: AsyncEngine) -> Iterator[None]:
    """
    Writes on ``engine`` in this block commit in their own transaction, outside
    the task's :func:`unit_of_work`, when that unit has not written yet; once it
    has, they join it as usual (on SQLite its writer lock is held: a transaction
    of their own would wait on it forever).

    For a write that records its own ``Idempotency-Key`` answer in its
    transaction (the store's ``recorded`` operations): it needs no unit, and
    joining one costs the unit's BEGIN, a savepoint and the commit, each a round
    trip to SQLite's driver thread, where a write of its own is one.
    """
    unit = _joined(engine)
    if unit is None or unit.began:
        yield
        return
    token = _UNIT.set(None)
    try:
        yield
    finally:
        _UNIT.reset(token)


@asynccontextmanager
async def read_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """
    A connection for reads: the unit of work's once it has written (so a route
    reads back its own uncommitted writes), a pooled one otherwise.
    """
    unit = _joined(engine)
    if unit is not None and unit.began:
        yield await unit.connection()
        return
    async with engine.connect() as conn:
        yield conn


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """
    A write transaction that commits on success and rolls back on any exception.

    On SQLite it takes the write lock up front (``BEGIN IMMEDIATE``): a deferred
    transaction that upgrades from reader to writer after another connection
    committed fails at once with ``SQLITE_BUSY`` instead of waiting on the busy
    timeout, so every writer (API, scheduler, relay, dispatcher, handlers) queues
    for the lock instead.

    Writers of one process also queue on an asyncio lock before BEGIN. SQLite's
    busy handler polls with sleeps growing to 100 ms and is not woken when the
    lock frees, so a waiting writer can sleep past the release; the asyncio queue
    hands the lock over at once and in arrival order, and keeps the waiting off
    the driver's threads. Other processes on the same file still meet
    ``busy_timeout``.

    Inside a :func:`unit_of_work` the block is a savepoint of the unit's
    transaction instead, committed only with the unit.
    """
    unit = _joined(engine)
    if unit is not None:
        conn = await unit.connection()
        async with conn.begin_nested():
            yield conn
        return
    sqlite = is_sqlite(url_text(engine))
    lock = writer_lock(engine) if sqlite else None
    if lock is not None:
        await lock.acquire()
    held = lock is not None
    try:
        async with engine.connect() as conn:
            if sqlite:
                await begin_immediate(conn)
            try:
                yield conn
            except BaseException:
                await conn.rollback()
                raise
            else:
                await conn.commit()
            finally:
                # Hand the writer on as soon as the transaction has ended: returning
                # the connection to the pool resets it, one more round trip to the
                # driver's thread that the next writer need not wait for.
                if lock is not None:
                    lock.release()
                    held = False
    finally:
        if held and lock is not None:
            lock.release()


async def any_row(engine: AsyncEngine, query: Select[Any]) -> bool:
    """
    Whether ``query`` finds a row, read without opening a write transaction.

    Pollers that claim work (scheduler ticks, retry sweeps) ask this first. On
    SQLite every write transaction queues for the one writer and holds it for at
    least a round of the event loop, so an empty claim every half second per
    poller took a fifth of the writer's time during a 20k burst, for nothing. A
    row that becomes due just after the probe is claimed on the next poll.
    """
    async with read_connection(engine) as conn:
        return (await conn.execute(query.limit(1))).first() is not None


def _sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, or ``None`` for an in-memory or ``file:`` URI database."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


CLEAN_CHECKIN = "delivery_clean_checkin"
"""
Set in a pooled SQLite connection's ``info`` by a caller that has just seen, on the
driver's thread, that the connection holds no transaction (``in_transaction`` false):
returning it to the pool then skips the rollback, which with aiosqlite is one more
round trip to that thread per checkout (a third of a short read's cost). The flag
holds for one return only.
"""


def _reset_unless_clean(dbapi_connection: Any, record: Any, state: Any) -> None:
    """
    The pool's reset on return (a rollback), as ``pool_reset_on_return="rollback"``
    does it, unless the connection was marked :data:`CLEAN_CHECKIN` for this return.
    """
    if record is not None and record.info.pop(CLEAN_CHECKIN, False):
        return
    if state.terminate_only or not state.asyncio_safe or state.transaction_was_reset:
        return
    dbapi_connection.rollback()


def _forget_clean(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    # A return that skipped the reset event (an invalidated connection) must not
    # leave the mark for the next checkout's return.
    record.info.pop(CLEAN_CHECKIN, None)


def _private_file_creator(path: Path) -> Callable[..., None]:
    def create(*_args: Any) -> None:
        # Returns None, so SQLAlchemy goes on to open the connection itself. A missing
        # folder is left for SQLite to report ("unable to open database file").
        if path.parent.is_dir():
            create_private_file(path)

    return create


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across process crashes in WAL mode (only an OS crash can
    # lose the last transactions), which is the failure model the restart recovery assumes.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # A checkpoint (copying WAL pages into the file, with an fsync) every 4 MB of
    # WAL took a fifth of the writer's time in a 100k burst: the same index pages
    # were copied again at every checkpoint. Every 64 MB they are copied less often.
    cursor.execute("PRAGMA wal_autocheckpoint=16384")
    # Every pooled connection (up to 15, each on its own aiosqlite thread) keeps its
    # own page cache, warm after a burst; the OS page cache still holds the file.
    # bench/bench_rss.py (1M stored, 100k due), one interleaved pair: 1 MiB each
    # peaked at 152 MB, 512 KiB at 150 MB (the budget), all notified in 5 s and 4 s.
    cursor.execute("PRAGMA cache_size=-512")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


LOOP_READ_STEPS = 50_000
"""
How many SQLite virtual machine steps a read may take on the event loop before it is
stopped and run on the pool's thread instead (:func:`read_on_loop`). A full page of
the queue (500 rows) takes about 26 000; a row the statement examines and filters out
(a pending message past its deadline that the expiry sweep has not reached yet) about
7, so a read that would filter more than about 7 000 such rows leaves the loop after
a few milliseconds rather than holding it for the whole backlog (100 000 expired rows:
90 ms, ``bench/bench_queue_expired.py``).
"""
_PROGRESS_EVERY = 1_000
"""SQLite calls the budget's handler every this many steps (a Python call each)."""


class _LoopReader:
    """
    A read-only SQLite connection used on the thread that opened it, and only there.

    Its progress handler stops a statement once the read has spent its budget
    (:data:`LOOP_READ_STEPS`, set again before each read): SQLite then raises
    ``OperationalError("interrupted")`` and the read goes through the pool.
    """

    def __init__(self, path: Path) -> None:
        self.thread = threading.get_ident()
        # Used on one thread only (checked by the caller); closed from any, at dispose.
        self.db = sqlite3.connect(
            path,
            isolation_level=None,
            check_same_thread=False,
            cached_statements=SQLITE_STATEMENT_CACHE,
        )
        # Never waits for a lock: a read that meets one is run on the pool instead.
        self.db.execute("PRAGMA busy_timeout=0")
        self.db.execute("PRAGMA query_only=ON")
        self.db.execute("PRAGMA cache_size=-512")
        self.calls_left = 0
        # SQLite counts a statement's steps across its runs (a cached statement
        # keeps counting), so the budget is a number of calls left, reset per read,
        # not "interrupt at the first call": that is off by at most one call.
        self.db.set_progress_handler(self._progress, _PROGRESS_EVERY)

    def _progress(self) -> int:
        self.calls_left -= 1
        return 1 if self.calls_left < 0 else 0


_LOOP_READERS: "weakref.WeakKeyDictionary[Any, _LoopReader | None]" = weakref.WeakKeyDictionary()
"""Per engine (its sync engine): its on-loop reader, or None where it cannot have one."""


def _loop_reader(engine: AsyncEngine) -> _LoopReader | None:
    sync_engine = engine.sync_engine
    try:
        reader = _LOOP_READERS[sync_engine]
    except KeyError:
        reader = _LOOP_READERS[sync_engine] = _open_loop_reader(engine)
    if reader is None or reader.thread != threading.get_ident():
        return None
    return reader


def _open_loop_reader(engine: AsyncEngine) -> _LoopReader | None:
    dialect = engine.dialect
    if dialect.name != "sqlite" or dialect.driver != "aiosqlite":
        return None
    path = _sqlite_file(engine.url.render_as_string(hide_password=False))
    # Only a database the pool has created (and migrated): never create a file here.
    if path is None or not path.is_file():
        return None
    try:
        reader = _LoopReader(path)
    except sqlite3.Error:
        return None
    event.listen(engine.sync_engine, "engine_disposed", lambda *_: _drop_loop_reader(engine))
    return reader


def _drop_loop_reader(engine: AsyncEngine) -> None:
    # Kept as None, not removed: a read arriving after the dispose (a poll in flight
    # at shutdown) then takes the pool's path instead of opening a connection that
    # nothing would close, and the listener is registered once per engine.
    reader = _LOOP_READERS.get(engine.sync_engine)
    _LOOP_READERS[engine.sync_engine] = None
    if reader is not None:
        reader.db.close()


def read_on_loop[T](engine: AsyncEngine, fn: Callable[[sqlite3.Connection], T]) -> T | None:
    """
    Run the read ``fn`` on the calling (event loop) thread, on a SQLite connection of its
    own; ``None`` when it cannot run there: then the caller reads the usual way.

    For short indexed reads only (the polling read of the notification queue). A read
    through the pool costs a checkout and a return (each a greenlet switch in
    SQLAlchemy's async adaptation) and a round trip to the connection's aiosqlite
    thread, whose answer wakes the loop through its self-pipe: together more than the
    statement itself (``bench/bench_api_cost.py --kind "GET queue" --profile``: 14% of
    busy samples against 8% for SQLite's work). In WAL mode a reader does not wait
    for the writer, so the loop is held only for the statement. It never waits for a
    lock (``busy_timeout`` 0) and never writes (``query_only``): a read that meets a
    lock or any other SQLite error returns ``None`` (the pool's path then waits or
    raises as before), and inside a request's unit of work that has written, the read
    must see its writes, so it returns ``None`` too.

    An indexed read can still examine many rows it then filters out (the queue's
    pending messages past their deadline, until the expiry sweep marks them): a read
    that takes more than :data:`LOOP_READ_STEPS` steps is stopped there and returns
    ``None``, so the loop is held for a few milliseconds at most and the whole read
    runs again on the pool's thread, which releases the GIL while SQLite works.
    """
    unit = _joined(engine)
    if unit is not None and unit.began:
        return None
    reader = _loop_reader(engine)
    if reader is None:
        return None
    reader.calls_left = LOOP_READ_STEPS // _PROGRESS_EVERY
    try:
        result = fn(reader.db)
    except sqlite3.Error:
        if reader.db.in_transaction:
            reader.db.rollback()
        return None
    return result
