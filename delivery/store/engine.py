"""
The async engine for SQLite (embedded default) and PostgreSQL (production).

SQLite is tuned for one writer with concurrent readers: WAL, a busy timeout so
short write contention waits instead of failing, and foreign keys on.
"""

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine


def is_sqlite(url: str) -> bool:
    """True for any ``sqlite`` URL, whatever the driver."""
    return url.startswith("sqlite")


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    """
    Build the async engine for ``url`` (``sqlite+aiosqlite://`` or ``postgresql+asyncpg://``).

    Raises:
        ValueError: for a URL of another database.
    """
    if is_sqlite(url):
        engine = create_async_engine(url, echo=echo, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    if url.startswith("postgresql"):
        return create_async_engine(
            url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
    raise ValueError(f"unsupported database URL scheme: {url.split(':', 1)[0]!r}")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL is durable across process crashes in WAL mode (only an OS crash can
    # lose the last transactions), which is the failure model of DESIGN invariant 3.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
