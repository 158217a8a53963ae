"""
Daemon memory: RSS of one ``delivery run`` (embedded SQLite + its nats-server child) with
1,000,000 stored schedules, while idle and during a burst of due fires. Target: <= 150 MB.

Run::

    .venv/bin/python bench/bench_rss.py            # 1,000,000 stored, 100,000 due in the burst
    .venv/bin/python bench/bench_rss.py --quick    # 100,000 stored, 10,000 due

The daemon is started as ``python -m delivery run`` from the current directory, so
running this script from another worktree (with that tree's venv) measures that
tree's daemon with this bench.

Before sampling, the bench uses the daemon's API the way a live deployment has: an
SDK-style POST (with an ``Idempotency-Key``, whose recorded response is sealed) and
a notification poll, so code paths that load on first use are counted in both windows.

RSS is sampled every 0.2 s with psutil: the daemon process alone, and the nats-server
child separately (a separate binary, reported for completeness). Idle is the window
between start-up (after a 5 s warm-up) and the scheduler's lookahead before the burst
minute (``DELIVERY_LOOKAHEAD_S``, 59 s, plus 5 s); the burst window starts there, so it
includes the staging of the due fires, and runs until every due schedule has its
notification.
"""

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import psutil  # type: ignore[import-untyped]
from bench_burst import NOTIFICATIONS, PROJECTS, SCHEDULES, ceil_minute, schedule_rows, spawn
from sqlalchemy import func, select

from delivery.settings import Settings
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate

MB = 1024 * 1024


@dataclass
class Samples:
    daemon: list[float] = field(default_factory=list)
    nats: list[float] = field(default_factory=list)

    def add(self, proc: psutil.Process) -> None:
        try:
            self.daemon.append(proc.memory_info().rss / MB)
            children = proc.children()
            self.nats.append(sum(c.memory_info().rss for c in children) / MB)
        except psutil.NoSuchProcess:
            pass

    def summary(self) -> str:
        if not self.daemon:
            return "no samples"
        median = sorted(self.daemon)[len(self.daemon) // 2]
        return (
            f"daemon max {max(self.daemon):.0f} MB (median {median:.0f}), "
            f"nats-server max {max(self.nats):.0f} MB"
        )


async def seed(url: str, stored: int, burst: int, due: datetime) -> float:
    """``burst`` schedules due at ``due``, the rest due days later; seconds taken."""
    started = time.perf_counter()
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                PROJECTS.insert().values(id="prj_bench", name="bench", created_at=datetime.now(UTC))
            )
            chunk: list[dict[str, Any]] = []
            for i, row in enumerate(schedule_rows(stored, due)):
                if i >= burst:
                    # Not part of the burst: due one to 30 days later, same wall time.
                    row["next_fire_at"] = due + timedelta(days=1 + i % 30)
                chunk.append(row)
                if len(chunk) == 10_000:
                    await conn.execute(SCHEDULES.insert(), chunk)
                    chunk = []
            if chunk:
                await conn.execute(SCHEDULES.insert(), chunk)
    finally:
        await engine.dispose()
    return time.perf_counter() - started


API_KEY = "dk_bench_rss_0123456789abcdef0123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def use_the_api(base_url: str, popen: Any) -> None:
    """What a live daemon has served before: an idempotent POST and a poll."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the daemon's API did not come up")
            await asyncio.sleep(0.2)
        created = await client.post(
            "/api/v1/agents/agent_0/wakeups",
            json={
                "user_id": "user_0",
                "check_type": "reminder",
                "intent": "hi",
                "delay_hours": 720,
            },
            headers={"Idempotency-Key": uuid.uuid4().hex},
        )
        created.raise_for_status()
        polled = await client.get("/api/v1/agents/agent_0/notifications", params={"user_id": "u"})
        polled.raise_for_status()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100,000 stored, 10,000 due")
    parser.add_argument("--stored", type=int, default=None)
    parser.add_argument("--burst", type=int, default=None)
    parser.add_argument(
        "--seed-s",
        type=float,
        default=None,
        help="seconds allowed for seeding before the burst's staging (default: 30 + stored/10,000;"
        " raise it on a loaded machine, where seeding 1,000,000 rows can take 300 s)",
    )
    args = parser.parse_args()
    stored = args.stored or (100_000 if args.quick else 1_000_000)
    burst = args.burst or stored // 10
    with tempfile.TemporaryDirectory(prefix="bench_rss_") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        url = f"sqlite+aiosqlite:///{data / 'delivery.db'}"
        await migrate(url)
        # Seeding 1M rows takes a while on a shared machine: aim the burst after it.
        staging = timedelta(seconds=Settings().lookahead_s + 5)
        seed_s = args.seed_s if args.seed_s is not None else 30 + stored / 10_000
        due = ceil_minute(datetime.now(UTC), at_least=staging + timedelta(seconds=seed_s))
        took = await seed(url, stored, burst, due)
        print(f"stored {stored:,} schedules ({burst:,} due at {due:%H:%M:%S} UTC) in {took:.0f} s")
        if due - datetime.now(UTC) < staging + timedelta(seconds=10):
            raise RuntimeError("seeding overran the burst minute; rerun")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
        port = free_port()
        env.update(
            DELIVERY_DATA_DIR=str(data),
            DELIVERY_PORT=str(port),
            DELIVERY_BOOTSTRAP_API_KEY=API_KEY,
            DELIVERY_LOG_LEVEL="WARNING",
            DELIVERY_LOG_JSON="true",
        )
        popen = spawn(["run"], env, Path(tmp) / "daemon.log")
        proc = psutil.Process(popen.pid)
        engine = create_engine(url)
        idle, during = Samples(), Samples()
        try:
            await use_the_api(f"http://127.0.0.1:{port}", popen)
            warm = time.monotonic() + 5
            while datetime.now(UTC) < due - staging:
                if time.monotonic() > warm:
                    idle.add(proc)
                await asyncio.sleep(0.2)
            last_count = time.monotonic()
            while True:
                during.add(proc)
                await asyncio.sleep(0.2)
                if time.monotonic() - last_count > 1:
                    last_count = time.monotonic()
                    async with engine.connect() as conn:
                        # Pending only: a staged row is composed but not shown yet.
                        made = (
                            await conn.execute(
                                select(func.count())
                                .select_from(NOTIFICATIONS)
                                .where(NOTIFICATIONS.c.status == "pending")
                            )
                        ).scalar_one()
                    if made >= burst:
                        break
                if popen.poll() is not None:
                    tail = (Path(tmp) / "daemon.log").read_text()[-3000:]
                    raise RuntimeError(f"daemon exited with {popen.returncode}:\n{tail}")
            done_s = (datetime.now(UTC) - due).total_seconds()
        finally:
            await engine.dispose()
            popen.terminate()
            popen.wait(timeout=60)
        print(f"idle ({stored:,} stored): {idle.summary()}")
        print(f"burst ({burst:,} due, all notified within {done_s:.0f} s): {during.summary()}")
        verdict = "meets" if max(idle.daemon + during.daemon) <= 150 else "exceeds"
        print(f"target <= 150 MB for the daemon: {verdict}")


if __name__ == "__main__":
    asyncio.run(main())
