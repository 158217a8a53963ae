"""
What the channels worker's quiet-hours check costs per retry, on SQLite.

Each push / email / SMS retry (and fallback step) asks whether its user is inside
quiet hours before sending. It used to read the user's row each time
(``PolicyStore.get_quiet_hours``); it now asks the dispatcher's per-project cache
(``Policies.rules``) whether the project has quiet hours at all, and reads the user's
row only in a project that has some. This times both checks for a project without
quiet hours (the common case), ``--checks`` times each, one after another.

    .venv/bin/python bench/bench_quiet_hours_check.py
"""

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from delivery.dispatcher.policies import Policies
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.policy import PolicyStore
from delivery.store.sql import SqlStore


async def _run(checks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        await migrate(url)
        engine = create_engine(url)
        try:
            project_id = (await SqlStore(engine).keys.ensure_project("b", datetime.now(UTC))).id
            store = PolicyStore(engine)
            cached = Policies(store, ttl_s=5.0)
            kinds: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                ("read per retry (before)", lambda: store.get_quiet_hours(project_id, "u1")),
                ("cached project rules (after)", lambda: cached.rules((project_id,))),
            ]
            for label, check in kinds:
                for _ in range(50):
                    await check()
                cpu, wall = time.process_time(), time.perf_counter()
                for _ in range(checks):
                    await check()
                cpu_us = (time.process_time() - cpu) / checks * 1e6
                wall_us = (time.perf_counter() - wall) / checks * 1e6
                print(f"{label:30} {cpu_us:7.1f} us CPU {wall_us:7.1f} us wall per check")
        finally:
            await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=3000)
    asyncio.run(_run(parser.parse_args().checks))


if __name__ == "__main__":
    main()
