"""
Next-fire throughput of the cadence engine against croniter and APScheduler 3's CronTrigger.

Run: ``.venv/bin/python bench/bench_cadence.py`` (``--quick`` for a few-second smoke run).

Two cadences, each across 20 zones and many query instants in 2026:
(a) a simple daily cadence at 08:00 and 20:00 (cron ``0 8,20 * * *`` for the peers);
(b) the weekday cron ``30 8 * * 1-5``.
Query instants within three days of a zone's DST transition are left out, because
croniter is known to get those wrong (it fires gap times at the jump and fold
times twice); on the rest all three libraries must agree, and the script asserts it.
Each figure is the best of several timed passes, since the machine is shared.
"""

import argparse
import random
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apscheduler.triggers.cron import CronTrigger
from croniter import croniter

from delivery.cadence import CompiledSchedule, compile_schedule, next_fire
from delivery.tz import tzdata_version

ZONES = [
    "UTC",
    "America/New_York",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "America/Santiago",
    "America/Havana",
    "Europe/London",
    "Europe/Berlin",
    "Europe/Dublin",
    "Europe/Moscow",
    "Africa/Cairo",
    "Africa/Casablanca",
    "Asia/Tehran",
    "Asia/Kolkata",
    "Asia/Singapore",
    "Asia/Tokyo",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Pacific/Auckland",
    "Pacific/Chatham",
]
CASES: dict[str, tuple[dict[str, Any], str, dict[str, str]]] = {
    "daily two times": (
        {"simple": {"frequency": "daily", "times": ["08:00", "20:00"]}},
        "0 8,20 * * *",
        {"hour": "8,20", "minute": "0"},
    ),
    "weekday cron 30 8 * * 1-5": (
        {"cron": "30 8 * * 1-5"},
        "30 8 * * 1-5",
        {"day_of_week": "mon-fri", "hour": "8", "minute": "30"},
    ),
}
TARGET_SIMPLE = 80_000
TARGET_CRON_RATIO = 5.0


def _transitions(zone: ZoneInfo, year: int) -> list[datetime]:
    step = timedelta(hours=1)
    t = datetime(year, 1, 1, tzinfo=UTC)
    found = []
    previous = t.astimezone(zone).utcoffset()
    while t.year == year:
        t += step
        offset = t.astimezone(zone).utcoffset()
        if offset != previous:
            found.append(t)
        previous = offset
    return found


def _query_instants(zone: ZoneInfo, count: int, rng: random.Random) -> list[datetime]:
    """Instants in 2026 at least three days away from any offset change in the zone."""
    transitions = _transitions(zone, 2026)
    start = datetime(2026, 1, 5, tzinfo=UTC)
    instants: list[datetime] = []
    while len(instants) < count:
        t = start + timedelta(seconds=rng.randrange(350 * 86400))
        if all(abs(t - x) > timedelta(days=3) for x in transitions):
            instants.append(t)
    return instants


def _best_rate(run: Callable[[], int], passes: int) -> float:
    best = 0.0
    for _ in range(passes):
        began = time.perf_counter()
        calls = run()
        elapsed = time.perf_counter() - began
        best = max(best, calls / elapsed)
    return best


def _run_ours(schedules: list[tuple[CompiledSchedule, list[datetime]]], repeat: int) -> int:
    calls = 0
    for _ in range(repeat):
        for schedule, instants in schedules:
            for after in instants:
                next_fire(schedule, after)
            calls += len(instants)
    return calls


def _run_croniter(
    expression: str, queries: dict[str, list[datetime]], zones: list[ZoneInfo]
) -> int:
    calls = 0
    for name, zone in zip(ZONES, zones, strict=True):
        for after in queries[name]:
            croniter(expression, after.astimezone(zone)).get_next(datetime)
            calls += 1
    return calls


def _aps_next(trigger: CronTrigger, zone: ZoneInfo, after: datetime) -> datetime | None:
    # CronTrigger returns the first fire at or after `now`; fires are whole
    # minutes and queries whole seconds, so +1 us means "strictly after".
    fire: datetime | None = trigger.get_next_fire_time(
        None, after.astimezone(zone) + timedelta(microseconds=1)
    )
    return fire


def _run_aps(triggers: list[tuple[CronTrigger, ZoneInfo, list[datetime]]]) -> int:
    calls = 0
    for trigger, zone, instants in triggers:
        for after in instants:
            _aps_next(trigger, zone, after)
            calls += 1
    return calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    args = parser.parse_args()
    per_zone = 20 if args.quick else 100
    ours_repeat = 5 if args.quick else 40
    passes = 2 if args.quick else 3

    rng = random.Random(20260501)
    zones = [ZoneInfo(name) for name in ZONES]
    queries = {
        name: _query_instants(zone, per_zone, rng) for name, zone in zip(ZONES, zones, strict=True)
    }
    created = datetime(2026, 1, 1, tzinfo=UTC)
    print(f"tzdata {tzdata_version()}, {len(ZONES)} zones x {per_zone} query instants,", end=" ")
    print(f"best of {passes}")
    header = ("case", "ours/s", "croniter/s", "APS3/s", "vs croniter", "vs APS3")
    print(f"{header[0]:<28}{header[1]:>12}{header[2]:>12}{header[3]:>12}", end="")
    print(f"{header[4]:>13}{header[5]:>10}")

    failures: list[str] = []
    for case, (shape, expression, fields) in CASES.items():
        schedules = [
            (compile_schedule({**shape, "timezone": name}, created_at=created), queries[name])
            for name in ZONES
        ]
        triggers = [
            (CronTrigger(timezone=zone, **fields), zone, queries[name])
            for name, zone in zip(ZONES, zones, strict=True)
        ]

        ours = partial(_run_ours, schedules, ours_repeat)
        cron_iter = partial(_run_croniter, expression, queries, zones)
        aps = partial(_run_aps, triggers)

        # Identical results on every query, as UTC instants.
        for (schedule, instants), (trigger, zone, _) in zip(schedules, triggers, strict=True):
            for after in instants:
                mine = next_fire(schedule, after)
                theirs = croniter(expression, after.astimezone(zone)).get_next(datetime)
                aps_fire = _aps_next(trigger, zone, after)
                if not (mine == theirs == aps_fire):
                    failures.append(
                        f"{case} {schedule.timezone} after {after}: {mine} {theirs} {aps_fire}"
                    )

        rate_ours = _best_rate(ours, passes)
        rate_croniter = _best_rate(cron_iter, passes)
        rate_aps = _best_rate(aps, passes)
        print(
            f"{case:<28}{rate_ours:>12,.0f}{rate_croniter:>12,.0f}{rate_aps:>12,.0f}"
            f"{rate_ours / rate_croniter:>12.1f}x{rate_ours / rate_aps:>9.1f}x"
        )
        if case.startswith("daily") and rate_ours < TARGET_SIMPLE:
            print(f"  below target: {rate_ours:,.0f} < {TARGET_SIMPLE:,} next-fires/s")
        if rate_ours / rate_croniter < TARGET_CRON_RATIO:
            print(
                f"  below target: {rate_ours / rate_croniter:.1f}x < {TARGET_CRON_RATIO}x croniter"
            )

    total = len(ZONES) * per_zone * len(CASES)
    if failures:
        print(f"results differ on {len(failures)} of {total} queries:")
        for line in failures[:10]:
            print("  " + line)
        return 1
    print(f"results identical on all {total} queries (ours == croniter == APScheduler 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
