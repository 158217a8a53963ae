"""SQLite's pool keeps every connection it opens: concurrent requests never reopen one."""

import asyncio
from pathlib import Path

from sqlalchemy import event, text

from delivery.store.engine import SQLITE_POOL_SIZE, create_engine


async def test_concurrent_reads_open_at_most_the_pool_and_close_none(tmp_path: Path) -> None:
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'pool.db'}")
    opened: list[object] = []
    closed: list[object] = []
    event.listen(eng.sync_engine, "connect", lambda *_: opened.append(1))
    event.listen(eng.sync_engine.pool, "close", lambda *_: closed.append(1))

    async def reads() -> None:
        for _ in range(20):
            async with eng.connect() as conn:
                await conn.execute(text("SELECT 1"))
                await asyncio.sleep(0)

    try:
        for _ in range(3):
            await asyncio.gather(*(reads() for _ in range(64)))
        assert 1 < len(opened) <= SQLITE_POOL_SIZE
        assert closed == []
    finally:
        await eng.dispose()
