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

``--compare-replicas`` (PostgreSQL) runs the burst with 1 scheduler + 1
dispatcher, then with 3 schedulers + 2 dispatchers, and prints both and the
ratio of fires/s (``--replicas`` / ``--dispatchers`` set one shape)::

    .venv/bin/python bench/bench_burst.py --compare-replicas --lookahead-s 0 \
        --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/test

``--restart-after-s 600`` measures catch-up after downtime instead: the schedules
are seeded as they stand after 10 minutes with no scheduler (each one's
``next_fire_at`` a whole minute at least that long ago, unhandled; within
``DELIVERY_MAX_LATENESS_S``, so each is produced once), then the daemon starts;
times and lateness count from its start. The peer's jobs get a next run time
that long before ``start()``::

    .venv/bin/python bench/bench_burst.py --restart-after-s 600

``--daemon-env NAME=VALUE`` passes a setting to the daemon processes
(``--daemon-env DELIVERY_CLAIM_BATCH=5000``). ``--no-peer`` skips APScheduler. The
daemon runs with ``DELIVERY_LOG_LEVEL=WARNING`` so 100,000 per-notification log
lines do not take the CPU the figure is about.
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
    engine: AsyncEngine,
    count: int,
    due: datetime,
    *,
    timeout_s: float,
    origin: datetime | None = None,
) -> dict[str, Any]:
    """
    Poll until all ``count`` notifications are pending; the timings, from the database.

    Times are measured from ``origin`` (default ``due``): for a restart after
    downtime that is the daemon's start, and lateness is also counted from it for
    fires that fell due while it was down (``lateness_since_due`` keeps the raw
    ``created_at - fire_at``).

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
    start = origin or due
    lateness = [(r.created_at - max(r.fire_at, start)).total_seconds() for r in rows]
    result = {
        "notifications": len(rows),
        "pending": sum(1 for r in rows if r.status == "pending"),
        "fires": fires,
        "all_pending_s": (max(r.created_at for r in rows) - start).total_seconds(),
        "all_fires_committed_s": (last_fire - start).total_seconds(),
        "all_fires_published_s": (published - start).total_seconds() if published else None,
        "lateness": Distribution.of(lateness),
    }
    if origin is not None:
        since_due = [(r.created_at - r.fire_at).total_seconds() for r in rows]
        result["lateness_since_due"] = Distribution.of(since_due)
    return result


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
        if args.restart_after_s is not None:
            # As the data stands after that much downtime: every schedule's
            # next_fire_at is a whole minute (daily HH:MM) that long ago, unhandled.
            overdue = datetime.now(UTC) - timedelta(seconds=args.restart_after_s)
            due = overdue.replace(second=0, microsecond=0)
        else:
            due = ceil_minute(datetime.now(UTC), at_least=lead)
        seeded = await seed(engine, args.count, due, budget=budget)
        lookahead = {} if args.lookahead_s is None else {"DELIVERY_LOOKAHEAD_S": args.lookahead_s}
        lookahead.update(pair.split("=", 1) for pair in args.daemon_env)
        print(f"seeded {args.count:,} schedules in {seeded:.1f} s; all due at {due:%H:%M:%S} UTC")
        restarted: datetime | None = None
        if args.restart_after_s is not None:
            restarted = datetime.now(UTC)
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
            procs += [spawn(["dispatcher"], env, log) for _ in range(args.dispatchers)]
        else:
            env = daemon_env(**lookahead, DELIVERY_DATA_DIR=str(workdir / "data"))
            procs.append(spawn(["run"], env, log))
        if restarted is not None:
            wait = 0.0
            down = (restarted - due).total_seconds()
            print(f"daemon started {down:.0f} s after the fires fell due (the downtime)")
        else:
            wait = (due - datetime.now(UTC)).total_seconds()
            if wait < 5:
                raise RuntimeError("seeding took too long; the burst minute has passed")
            print(f"daemon started; burst in {wait:.0f} s")
        result = await wait_idle_then_burst(
            engine, args.count, due, timeout_s=wait + args.timeout, origin=restarted
        )
        if restarted is not None:
            result["downtime_s"] = (restarted - due).total_seconds()
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a daemon process exited with {proc.returncode}; see {log}")
        result["daemon_warnings"] = warnings_in(log)
        # Other work shares the machine: the load at the end says how much.
        result["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        # CPU of the daemon processes themselves (not a spawned nats-server): on a
        # shared machine a steadier figure than the wall-clock ones.
        result["daemon_cpu_s"] = sum(
            sum(psutil.Process(proc.pid).cpu_times()[:2]) for proc in procs
        )
        # The nats-server `delivery run` spawned (a child): its share of the hops.
        result["nats_cpu_s"] = sum(
            sum(child.cpu_times()[:2])
            for proc in procs
            for child in psutil.Process(proc.pid).children(recursive=True)
        )
        # Fires the scheduler handed to the dispatcher in its own process: their
        # fire.created rows were held (available after they were written).
        o = OutboxRow.__table__.c  # type: ignore[attr-defined]
        async with engine.connect() as conn:
            result["fires_handed"] = (
                await conn.execute(
                    select(func.count()).where(
                        o.subject.like("%.fire.created"), o.available_at > o.created_at
                    )
                )
            ).scalar_one()
            # Of those, the ones the relay published once their hold ran out (the
            # in-process dispatcher had not stamped them in time): work done twice,
            # the second notification absorbed by the unique source id.
            result["handed_relayed"] = (
                await conn.execute(
                    select(func.count()).where(
                        o.subject.like("%.fire.created"),
                        o.available_at > o.created_at,
                        o.sent_at >= o.available_at,
                    )
                )
            ).scalar_one()
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


async def peer(
    count: int, *, misfire_grace_time: float | None = 1.0, overdue_s: float | None = None
) -> dict[str, Any]:
    """
    APScheduler 3 (AsyncIOScheduler, MemoryJobStore): ``count`` cron jobs due in one minute.

    ``misfire_grace_time=1`` is APScheduler's default (a job processed more than 1 s
    late is dropped as misfired); ``None`` runs every job however late.

    With ``overdue_s`` the jobs' next run time is that long before ``start()`` (as a
    persistent job store holds them after that much downtime; coalescing, its
    default, is moot with one missed run per job), and times and lateness count
    from ``start()``.
    """
    from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobEvent
    from apscheduler.schedulers.asyncio import AsyncIOScheduler
    from apscheduler.triggers.cron import CronTrigger

    # APScheduler 3 needs ~0.3 ms per add_job (measured): leave room.
    lead = timedelta(seconds=max(20.0, count * 0.0008))
    if overdue_s is not None:
        due = (datetime.now(UTC) - timedelta(seconds=overdue_s)).replace(second=0, microsecond=0)
    else:
        due = ceil_minute(datetime.now(UTC), at_least=lead)
    restarted = 0.0
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
        lateness = time.time() - max(event.scheduled_run_time.timestamp(), restarted)
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
        trigger = CronTrigger(hour=local.hour, minute=local.minute, timezone=zone)
        if overdue_s is not None:
            scheduler.add_job(job, trigger, id=f"j{i}", next_run_time=due)
        else:
            scheduler.add_job(job, trigger, id=f"j{i}")
    add_s = time.perf_counter() - started
    if overdue_s is not None:
        restarted = time.time()
    scheduler.start()
    try:
        await asyncio.wait_for(
            done.wait(), max(0.0, (due - datetime.now(UTC)).total_seconds()) + 600
        )
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
    parser.add_argument("--replicas", type=int, default=1, help="scheduler processes (PostgreSQL)")
    parser.add_argument(
        "--dispatchers", type=int, default=1, help="dispatcher processes (PostgreSQL)"
    )
    parser.add_argument(
        "--compare-replicas",
        action="store_true",
        help="PostgreSQL: run 1 scheduler + 1 dispatcher, then 3 schedulers + 2 dispatchers, "
        "and print the ratio (no peer)",
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
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra DELIVERY_* setting for the daemon processes (repeatable)",
    )
    parser.add_argument(
        "--restart-after-s",
        type=float,
        default=None,
        help="catch-up instead of a burst: the fires fell due this many seconds before the "
        "daemon starts (it was down); times count from its start",
    )
    args = parser.parse_args()
    args.count = args.count or (5_000 if args.quick else 100_000)
    if args.compare_replicas and not args.database_url:
        parser.error("--compare-replicas needs --database-url (PostgreSQL)")
    shape = (
        f"PostgreSQL, {args.replicas} scheduler(s) + {args.dispatchers} dispatcher(s)"
        if args.database_url
        else "embedded (`delivery run`, SQLite + spawned nats-server)"
    )
    restart = args.restart_after_s is not None
    what = (
        f"all due {args.restart_after_s:.0f} s before the daemon starts (restart catch-up)"
        if restart
        else "all due in one minute"
    )
    print(f"burst of {args.count:,} schedules, {len(ZONES)} zones, {what}; {shape}")
    if args.attention_budget:
        await budget_pair(args)
        return
    if args.compare_replicas:
        await replicas_pair(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench_burst_") as tmp:
        result = await ours(args, Path(tmp))
    ours_lateness = result["lateness"]
    since = "the restart" if restart else "the minute"
    print(
        f"ours: all {result['notifications']:,} notifications pending "
        f"{result['all_pending_s']:.2f} s after {since} (fires all committed at "
        f"{result['all_fires_committed_s']:.2f} s, all published to JetStream at "
        f"{result['all_fires_published_s']:.2f} s); {rate(result):,.0f} fires/s; "
        f"lateness {ours_lateness}"
    )
    if restart:
        print(
            f"ours: downtime {result['downtime_s']:.0f} s; lateness counted from the fire "
            f"instant {result['lateness_since_due']}; target: all pending with p99 <= 10 s "
            f"after the restart ({args.count / 10:,.0f} fires/s)"
        )
    print(
        f"daemon CPU: {result['daemon_cpu_s']:.1f} s "
        f"(its nats-server {result['nats_cpu_s']:.1f} s); "
        f"fires handed off in-process: {result['fires_handed']:,} "
        f"(relayed after their hold too: {result['handed_relayed']:,}); "
        f"load average {result['loadavg']}"
    )
    print(f"daemon warnings and errors: {result['daemon_warnings'] or 'none'}")
    figures: dict[str, Any] = {"ours": jsonable(result)}
    if not args.no_peer:
        overdue = args.restart_after_s
        aps = f"APScheduler {_aps_version()}, {args.count:,} cron jobs in memory"
        if restart:
            aps += f", next run {overdue:.0f} s before start()"
        default = await peer(args.count, overdue_s=overdue)
        print(
            f"peer ({aps}, default misfire_grace_time=1 s): add {default['add_s']:.1f} s; "
            f"ran {default['ran']:,}, dropped as misfired {default['missed']:,}; "
            f"lateness when processed {default['lateness']}"
        )
        patient = await peer(args.count, misfire_grace_time=None, overdue_s=overdue)
        print(
            f"peer ({aps}, misfire_grace_time=None so every job runs): "
            f"add {patient['add_s']:.1f} s; ran {patient['ran']:,}; all run "
            f"{patient['all_processed_s']:.2f} s after {since}; lateness {patient['lateness']}"
        )
        p50 = patient["lateness"].p50 / ours_lateness.p50
        p99 = patient["lateness"].p99 / ours_lateness.p99
        print(
            f"ratio (peer / ours): p50 {p50:.1f}x, p99 {p99:.1f}x lateness; with its defaults "
            f"the peer delivers {default['ran']:,} of {args.count:,}, ours {result['pending']:,}"
        )
        figures["peer_default"] = jsonable(default)
        figures["peer_no_grace"] = jsonable(patient)
    print(json.dumps(figures, default=str))


def rate(result: dict[str, Any]) -> float:
    """Fires per second end to end: notifications over the time until all were pending."""
    return float(result["notifications"]) / max(float(result["all_pending_s"]), 1e-9)


def jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: vars(v) if isinstance(v, Distribution) else v for k, v in result.items()}


async def replicas_pair(args: argparse.Namespace) -> None:
    """The burst with 1 scheduler + 1 dispatcher, then 3 + 2, on PostgreSQL; the ratio."""
    runs: dict[str, dict[str, Any]] = {}
    for replicas, dispatchers in ((1, 1), (3, 2)):
        args.replicas, args.dispatchers = replicas, dispatchers
        label = f"{replicas} scheduler(s) + {dispatchers} dispatcher(s)"
        since = "the restart" if args.restart_after_s is not None else "the minute"
        with tempfile.TemporaryDirectory(prefix="bench_burst_") as tmp:
            result = await ours(args, Path(tmp))
        runs[label] = result
        print(
            f"{label}: all {result['pending']:,} of {result['notifications']:,} pending "
            f"{result['all_pending_s']:.2f} s after {since} ({rate(result):,.0f} fires/s); "
            f"lateness {result['lateness']}; daemon CPU {result['daemon_cpu_s']:.1f} s; "
            f"load average {result['loadavg']}; warnings {result['daemon_warnings'] or 'none'}"
        )
    one, many = runs.values()
    print(
        f"ratio (3+2 / 1+1): fires/s {rate(many) / rate(one):.2f}x (target >= 1.5x), "
        f"daemon CPU {many['daemon_cpu_s'] / one['daemon_cpu_s']:.2f}x; "
        f"this machine has {os.cpu_count()} cores"
    )
    print(json.dumps({k: jsonable(v) for k, v in runs.items()}, default=str))


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
