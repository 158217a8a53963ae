"""
Idempotent creations through a SIGKILL: keys sent, answered before the kill, interrupted,
retries needed after the restart, the slowest retry, and duplicates, on SQLite
(``delivery run``) and PostgreSQL (``delivery web``).

    .venv/bin/python bench/bench_idempotency_crash.py [--keys 2000] [--quick]

PostgreSQL is ``DELIVERY_TEST_DATABASE_URL``'s server (a scratch database is made and
dropped); NATS for ``delivery web`` is ``DELIVERY_NATS_URL`` (default 127.0.0.1:4222).
"""

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.api.crash_workload import run_workload, server_for
from tests.fixtures.db import create_pg_database, drop_pg_database


async def one(database_url: str, keys: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with server_for(database_url, Path(tmp)) as server:
            outcome = await run_workload(server, database_url, keys=keys, kill_after=keys // 3)
    duplicates = sum(count - 1 for count in outcome.written.values() if count > 1)
    missing = keys - len(outcome.written)
    print(
        f"{server.command:>3} on {database_url.split(':', 1)[0]:<18} keys {keys}"
        f"  answered before SIGKILL {len(outcome.answered_before_kill)}"
        f"  interrupted in flight {outcome.interrupted}"
        f"  retries needed {outcome.retries}"
        f"  replayed {outcome.replayed_after_restart}"
        f"  slowest retry {outcome.slowest_s * 1000:.0f} ms"
        f"  duplicates {duplicates}  missing {missing}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 keys")
    args = parser.parse_args()
    keys = 200 if args.quick else args.keys
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(one(f"sqlite+aiosqlite:///{Path(tmp) / 'delivery.db'}", keys))
    url = create_pg_database()  # runs its own event loop
    try:
        asyncio.run(one(url, keys))
    finally:
        drop_pg_database(url)


if __name__ == "__main__":
    main()
