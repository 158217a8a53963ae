"""
Burst: N schedules in mixed zones, all due in the same minute -> time until all N
notifications are pending, and the lateness distribution (notification created_at -
fire_at), against the peer: APScheduler 3 with the same N cron jobs in memory.

Run (the embedded default, SQLite + a spawned nats-server, one ``delivery run``)::

    .venv/bin/python bench/bench_burst.py            # 100,000 schedules
    .venv/bin/python bench/bench_burst.py --quick    # 5,000

PostgreSQL (a throw-away database is created on the server named by the URL and
dropped afterwards), with 1 or 3 ``delivery scheduler`` processes and one
``delivery dispatcher``::

    .venv/bin/python bench/bench_burst.py --replicas 3 \
        --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

``--attention-budget`` runs the burst twice in one invocation, without and then
with a project attention budget large enough to pass every message (each user
gets one), and prints both figures and their ratio: what deciding the budget in
the dispatcher's write transaction costs::

    .venv/bin/python bench/bench_burst.py --attention-budget --no-peer

``--no-peer`` skips APScheduler. The daemon runs with ``DELIVERY_LOG_LEVEL=WARNING``
so 100,000 per-notification log lines do not take the CPU the figure is about.
"""

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # type: ignore[import-untyped]
import psutil
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.embedded import EmbeddedNats
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.tables import (
    DeliveryPolicyRow,
    FireRow,
    NotificationRow,
    OutboxRow,
    ProjectRow,
    ScheduleRow,
)

SCHEDULES = ScheduleRow.__table__  # type: ignore[attr-defined]
FIRES = FireRow.__table__  # type: ignore[attr-defined]
NOTIFICATIONS = NotificationRow.__table__  # type: ignore[attr-defined]
PROJECTS = ProjectRow.__table__  # type: ignore[attr-defined]
OUTBOX = OutboxRow.__table__  # type: ignore[attr-defined]
POLICIES = DeliveryPolicyRow.__table__  # type: ignore[attr-defined]

GENEROUS_BUDGET = '{"attention_budget":{"limit":1000,"window_seconds":86400},"outside_window":null}'
"""A budget every user of the burst stays within (each gets one message)."""

ZONES = [
    "UTC",
    "America/New_York",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Moscow",
    "Africa/Cairo",
    "Asia/Tehran",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Singapore",
    "Asia/Tokyo",
    "Australia/Adelaide",
    "Australia/Lord_Howe",
    "Pacific/Auckland",
    "Pacific/Chatham",
]


def ceil_minute(instant: datetime, *, at_least: timedelta) -> datetime:
    """The first whole minute at least ``at_least`` after ``instant``."""
    target = instant + at_least
    floor = target.replace(second=0, microsecond=0)
    return floor if floor == target else floor + timedelta(minutes=1)


def schedule_rows(count: int, due: datetime, *, offset: int = 0) -> Iterator[dict[str, Any]]:
    """Daily schedules (one per user) in rotating zones whose local HH:MM is ``due``."""
    created = due - timedelta(days=1)
    cadences = []
    for zone in ZONES:
        local = due.astimezone(ZoneInfo(zone))
        cadences.append(
            (
                zone,
                f'{{"simple":{{"frequency":"daily","times":["{local:%H:%M}"]}},'
                f'"timezone":"{zone}"}}',
            )
        )
    for i in range(offset, offset + count):
        zone, cadence = cadences[i % len(cadences)]
        yield {
            "id": f"sch_{i:08d}",
            "project_id": "prj_bench",
            "agent_id": f"agent_{i % 100}",
            "user_id": f"user_{i}",
            "cadence_type": "simple",
            "cadence_json": cadence,
            "timezone": zone,
            "active_window_json": None,
            "intent": "take your medication",
            "check_type": "medication",
            "inventory_item_id": None,
            "metadata_json": None,
            "starts_at": None,
            "ends_at": None,
            "anchor_at": created,
            "enabled": True,
            "next_fire_at": due,
            "last_fire_at": None,
            "claimed_by": None,
            "claimed_until": None,
            "version": 1,
            "created_at": created,
            "updated_at": created,
        }


async def seed(
    engine: AsyncEngine, count: int, due: datetime, *, offset: int = 0, budget: bool = False
) -> float:
    """
    Insert the project (once) and ``count`` schedules; returns seconds taken. With
    ``budget`` the project gets :data:`GENEROUS_BUDGET`.
    """
    started = time.perf_counter()
    async with engine.begin() as conn:
        if offset == 0:
            await conn.execute(
                PROJECTS.insert().values(id="prj_bench", name="bench", created_at=datetime.now(UTC))
            )
            if budget:
                await conn.execute(
                    POLICIES.insert().values(
                        project_id="prj_bench",
                        policy_json=GENEROUS_BUDGET,
                        updated_at=datetime.now(UTC),
                    )
                )
        chunk: list[dict[str, Any]] = []
        for row in schedule_rows(count, due, offset=offset):
            chunk.append(row)
            if len(chunk) == 5000:
                await conn.execute(SCHEDULES.insert(), chunk)
                chunk = []
        if chunk:
            await conn.execute(SCHEDULES.insert(), chunk)
    return time.perf_counter() - started


async def scalar(engine: AsyncEngine, stmt: Any) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(stmt)).scalar_one()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


@dataclass
class Distribution:
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Distribution":
        ordered = sorted(values)
        return cls(
            percentile(ordered, 0.5),
            percentile(ordered, 0.99),
            ordered[-1] if ordered else float("nan"),
        )

    def __str__(self) -> str:
        return f"p50 {self.p50:.2f} s, p99 {self.p99:.2f} s, max {self.max:.2f} s"


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(DELIVERY_LOG_LEVEL="WARNING", DELIVERY_LOG_JSON="true", DELIVERY_PORT="0")
    env.update(extra)
    return env


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "delivery", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_idle_then_burst(
    engine: AsyncEngine, count: int, due: datetime, *, timeout_s: float
) -> dict[str, Any]:
    """
    Poll until all ``count`` notifications are pending; the timings, from the database.

    Only ``pending`` counts: a fire staged ahead is composed early into a hidden
    ``staged`` row whose ``created_at`` is a placeholder until the relay shows it
    (delivery.store.staging), and a client cannot see it before then.
    """
    deadline = time.monotonic() + timeout_s
    pending = (
        select(func.count()).select_from(NOTIFICATIONS).where(NOTIFICATIONS.c.status == "pending")
    )
    while True:
        made = await scalar(engine, pending)
        if made >= count:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {made} of {count} notifications pending after {timeout_s} s")
        await asyncio.sleep(0.25)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(NOTIFICATIONS.c.fire_at, NOTIFICATIONS.c.created_at, NOTIFICATIONS.c.status)
            )
        ).all()
        last_fire = (await conn.execute(select(func.max(FIRES.c.created_at)))).scalar_one()
        fires = (await conn.execute(select(func.count()).select_from(FIRES))).scalar_one()
        # When the relay had handed every fire to JetStream: the rest is the dispatcher.
        published = (
            await conn.execute(
                select(func.max(OUTBOX.c.sent_at)).where(OUTBOX.c.subject.like("%.fire.%"))
            )
        ).scalar_one()
    lateness = [(r.created_at - r.fire_at).total_seconds() for r in rows]
    return {
        "notifications": len(rows),
        "pending": sum(1 for r in rows if r.status == "pending"),
        "fires": fires,
        "all_pending_s": (max(r.created_at for r in rows) - due).total_seconds(),
        "all_fires_committed_s": (last_fire - due).total_seconds(),
        "all_fires_published_s": (published - due).total_seconds() if published else None,
        "lateness": Distribution.of(lateness),
    }


def warnings_in(log: Path) -> dict[str, int]:
    """Event name -> count of the daemon's warning and error lines (JSON logs)."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
            event = str(entry.get("event"))
            counts[event] = counts.get(event, 0) + 1
    return counts


async def ours(args: argparse.Namespace, workdir: Path, *, budget: bool = False) -> dict[str, Any]:
    """Run the burst through the service (with ``budget``: the project has one); the figures."""
    procs: list[subprocess.Popen[bytes]] = []
    nats_server: EmbeddedNats | None = None
    pg_admin: str | None = None
    log = workdir / "daemon.log"
    if args.database_url:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        pg_admin = (
            make_url(args.database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        conn = await asyncpg.connect(pg_admin)
        await conn.execute(f'CREATE DATABASE "{name}"')
        await conn.close()
        url = make_url(args.database_url).set(database=name).render_as_string(hide_password=False)
    else:
        url = f"sqlite+aiosqlite:///{workdir / 'data' / 'delivery.db'}"
        (workdir / "data").mkdir()
    await migrate(url)
    engine = create_engine(url)
    try:
        # Big bursts start the daemon more than the 59 s lookahead before the
        # minute, so staging gets exactly the window it has in production instead
        # of whatever the minute boundary leaves after seeding.
        lead = timedelta(seconds=25 if args.count <= 10_000 else 80)
        due = ceil_minute(datetime.now(UTC), at_least=lead)
        seeded = await seed(engine, args.count, due, budget=budget)
        lookahead = {} if args.lookahead_s is None else {"DELIVERY_LOOKAHEAD_S": args.lookahead_s}
        print(f"seeded {args.count:,} schedules in {seeded:.1f} s; all due at {due:%H:%M:%S} UTC")
        if args.database_url:
            nats_url = args.nats_url or os.environ.get("DELIVERY_NATS_URL", "")
            if not nats_url:
                nats_server = EmbeddedNats(workdir / "nats")
                nats_url = nats_server.start()
            env = daemon_env(
                **lookahead,
                DELIVERY_DATABASE_URL=url,
                DELIVERY_SECRET_KEY="bench-burst-key",  # noqa: S106 - a throwaway bench key
                DELIVERY_NATS_URL=nats_url,
                DELIVERY_SUBJECT_PREFIX=f"bench{uuid.uuid4().hex[:8]}",
            )
            procs += [spawn(["scheduler"], env, log) for _ in range(args.replicas)]
            procs.append(spawn(["dispatcher"], env, log))
        else:
            env = daemon_env(**lookahead, DELIVERY_DATA_DIR=str(workdir / "data"))
            procs.append(spawn(["run"], env, log))
        wait = (due - datetime.now(UTC)).total_seconds()
        if wait < 5:
            raise RuntimeError("seeding took too long; the burst minute has passed")
        print(f"daemon started; burst in {wait:.0f} s")
        result = await wait_idle_then_burst(engine, args.count, due, timeout_s=wait + args.timeout)
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a daemon process exited with {proc.returncode}; see {log}")
        result["daemon_warnings"] = warnings_in(log)
        # CPU of the daemon processes themselves (not a spawned nats-server): on a
        # shared machine a steadier figure than the wall-clock ones.
        result["daemon_cpu_s"] = sum(
            sum(psutil.Process(proc.pid).cpu_times()[:2]) for proc in procs
        )
        return result
    finally:
        stop_all(procs)
        await engine.dispose()
        if nats_server is not None:
            nats_server.stop()
        if pg_admin is not None:
            conn = await asyncpg.connect(pg_admin)
            await conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')
            await conn.close()


async def peer(count: int, *, misfire_grace_time: float | None = 1.0) -> dict[str, Any]:
    """
    APScheduler 3 (AsyncIOScheduler, MemoryJobStore): ``count`` cron jobs due in one minute.

    ``misfire_grace_time=1`` is APScheduler's default (a job processed more than 1 s
    late is dropped as misfired); ``None`` runs every job however late.
    """
    from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobEvent
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger

    # APScheduler 3 needs ~0.3 ms per add_job (measured): leave room.
    lead = timedelta(seconds=max(20.0, count * 0.0008))
    due = ceil_minute(datetime.now(UTC), at_least=lead)
    # One warning line per dropped job would dominate the output; count them instead.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    scheduler = AsyncIOScheduler(
        timezone=UTC, job_defaults={"misfire_grace_time": misfire_grace_time}
    )
    seen: list[float] = []
    ran: list[float] = []
    missed = 0
    done = asyncio.Event()

    async def job() -> None:
        return None

    def listener(event: JobEvent) -> None:
        nonlocal missed
        lateness = time.time() - event.scheduled_run_time.timestamp()
        seen.append(lateness)
        if event.code == EVENT_JOB_MISSED:
            missed += 1
        else:
            ran.append(lateness)
        if len(seen) >= count:
            done.set()

    scheduler.add_listener(listener, EVENT_JOB_EXECUTED | EVENT_JOB_MISSED)
    started = time.perf_counter()
    for i in range(count):
        zone = ZoneInfo(ZONES[i % len(ZONES)])
        local = due.astimezone(zone)
        scheduler.add_job(
            job, CronTrigger(hour=local.hour, minute=local.minute, timezone=zone), id=f"j{i}"
        )
    add_s = time.perf_counter() - started
    scheduler.start()
    try:
        await asyncio.wait_for(done.wait(), (due - datetime.now(UTC)).total_seconds() + 600)
    finally:
        scheduler.shutdown(wait=False)
    return {
        "add_s": add_s,
        "seen": len(seen),
        "missed": missed,
        "ran": len(ran),
        "lateness": Distribution.of(seen),
        "all_processed_s": max(seen),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5,000 schedules")
    parser.add_argument("--count", type=int, default=None, help="schedules (default 100,000)")
    parser.add_argument(
        "--database-url", default="", help="PostgreSQL server URL (default: embedded SQLite)"
    )
    parser.add_argument(
        "--nats-url", default="", help="external NATS for --database-url (default: spawn one)"
    )
    parser.add_argument(
        "--replicas", type=int, choices=[1, 3], default=1, help="scheduler processes (PostgreSQL)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds after the burst minute"
    )
    parser.add_argument("--no-peer", action="store_true", help="skip APScheduler")
    parser.add_argument(
        "--attention-budget",
        action="store_true",
        help="run the burst without, then with, a budget that passes everything (no peer)",
    )
    parser.add_argument(
        "--lookahead-s",
        default=None,
        help="DELIVERY_LOOKAHEAD_S for the daemon (default: the setting's default; 0 plans "
        "at fire time)",
    )
    args = parser.parse_args()
    args.count = args.count or (5_000 if args.quick else 100_000)
    shape = (
        f"PostgreSQL, {args.replicas} scheduler(s) + 1 dispatcher"
        if args.database_url
        else "embedded (`delivery run`, SQLite + spawned nats-server)"
    )
    print(f"burst of {args.count:,} schedules, {len(ZONES)} zones, all due in one minute; {shape}")
    if args.attention_budget:
        await budget_pair(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_burst_") as tmp:
        result = await ours(args, Path(tmp))
    ours_lateness = result["lateness"]
    print(
        f"ours: all {result['notifications']:,} notifications pending "
        f"{result['all_pending_s']:.2f} s after the minute (fires all committed at "
        f"{result['all_fires_committed_s']:.2f} s, all published to JetStream at "
        f"{result['all_fires_published_s']:.2f} s); lateness {ours_lateness}"
    )
    print(f"daemon CPU: {result['daemon_cpu_s']:.1f} s")
    print(f"daemon warnings and errors: {result['daemon_warnings'] or 'none'}")
    figures: dict[str, Any] = {"ours": {**result, "lateness": vars(ours_lateness)}}
    if not args.no_peer:
        aps = f"APScheduler {_aps_version()}, {args.count:,} cron jobs in memory"
        default = await peer(args.count)
        print(
            f"peer ({aps}, default misfire_grace_time=1 s): add {default['add_s']:.1f} s; "
            f"ran {default['ran']:,}, dropped as misfired {default['missed']:,}; "
            f"lateness when processed {default['lateness']}"
        )
        patient = await peer(args.count, misfire_grace_time=None)
        print(
            f"peer ({aps}, misfire_grace_time=None so every job runs): "
            f"add {patient['add_s']:.1f} s; ran {patient['ran']:,}; "
            f"lateness {patient['lateness']}"
        )
        p50 = patient["lateness"].p50 / ours_lateness.p50
        p99 = patient["lateness"].p99 / ours_lateness.p99
        print(
            f"ratio (peer / ours): p50 {p50:.1f}x, p99 {p99:.1f}x lateness; with its defaults "
            f"the peer delivers {default['ran']:,} of {args.count:,}, ours {result['pending']:,}"
        )
        figures["peer_default"] = {**default, "lateness": vars(default["lateness"])}
        figures["peer_no_grace"] = {**patient, "lateness": vars(patient["lateness"])}
    print(json.dumps(figures, default=str))


async def budget_pair(args: argparse.Namespace) -> None:
    """The burst without, then with, an attention budget that passes everything; the ratio."""
    runs: dict[str, dict[str, Any]] = {}
    for label, budget in (("budget off", False), ("budget on", True)):
        with tempfile.TemporaryDirectory(prefix="bench_burst_") as tmp:
            result = await ours(args, Path(tmp), budget=budget)
        runs[label] = result
        print(
            f"{label}: all {result['pending']:,} of {result['notifications']:,} pending "
            f"{result['all_pending_s']:.2f} s after the minute; lateness {result['lateness']}; "
            f"daemon CPU {result['daemon_cpu_s']:.1f} s; warnings "
            f"{result['daemon_warnings'] or 'none'}"
        )
    off, on = runs["budget off"], runs["budget on"]
    wall = on["all_pending_s"] / off["all_pending_s"]
    cpu = on["daemon_cpu_s"] / off["daemon_cpu_s"]
    print(
        f"ratio (budget on / off): all pending {wall:.2f}x, daemon CPU {cpu:.2f}x "
        f"(floor: within 1.15x)"
    )
    print(
        json.dumps(
            {k: {**v, "lateness": vars(v["lateness"])} for k, v in runs.items()}, default=str
        )
    )


def _aps_version() -> str:
    from importlib.metadata import version

    return version("apscheduler")


if __name__ == "__main__":
    asyncio.run(main())
