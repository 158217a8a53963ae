"""Table tests of the pure scheduler planning (delivery.planning): no clock, no I/O."""

import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from delivery.cadence import SkipReason, Tick, compile_schedule, next_fire, ticks_between
from delivery.planning import (
    MISSED_MAX_LATENESS,
    Skip,
    _ticks_and_next,
    fire_id,
    plan_ticks,
    scan_after,
)
from delivery.scheduler import CompiledCache

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
LATENESS = timedelta(hours=1)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def fired(hours: float) -> Tick:
    instant = at(hours)
    return Tick(fire_at=instant, local=instant.replace(tzinfo=None), skipped=None)


def skipped(hours: float, reason: SkipReason) -> Tick:
    instant = at(hours)
    return Tick(fire_at=instant, local=instant.replace(tzinfo=None), skipped=reason)


WINDOW = SkipReason.OUTSIDE_ACTIVE_WINDOW
GAP = SkipReason.DST_GAP

# (ticks, due_from, now, next_fire_at, ends_at, fires, skips, disable)
CASES = {
    "on time: one due tick fires": (
        [fired(0)],
        at(0),
        at(0),
        at(24),
        None,
        [at(0)],
        [],
        False,
    ),
    "late but within lateness still fires": (
        [fired(0)],
        at(0),
        at(0.99),
        at(24),
        None,
        [at(0)],
        [],
        False,
    ),
    "exactly at the lateness bound fires": (
        [fired(0)],
        at(0),
        at(1),
        at(24),
        None,
        [at(0)],
        [],
        False,
    ),
    "older than lateness is recorded as missed": (
        [fired(0)],
        at(0),
        at(1.01),
        at(24),
        None,
        [],
        [Skip(at(0), MISSED_MAX_LATENESS)],
        False,
    ),
    "catch-up: only fires within lateness are produced, once each": (
        [fired(0), fired(1), fired(2), fired(3)],
        at(0),
        at(3.5),
        at(4),
        None,
        [at(3)],
        [
            Skip(at(0), MISSED_MAX_LATENESS),
            Skip(at(1), MISSED_MAX_LATENESS),
            Skip(at(2), MISSED_MAX_LATENESS),
        ],
        False,
    ),
    "a firing tick before next_fire_at is ignored (already produced or superseded)": (
        [fired(-1), fired(0)],
        at(0),
        at(0),
        at(1),
        None,
        [at(0)],
        [],
        False,
    ),
    "active-window and DST-gap skips are recorded with their reason": (
        [skipped(-2, WINDOW), skipped(-1, GAP), fired(0)],
        at(0),
        at(0),
        at(1),
        None,
        [at(0)],
        [Skip(at(-2), "outside_active_window"), Skip(at(-1), "dst_gap")],
        False,
    ),
    "a window skip colliding with a fire instant is dropped: the fire wins": (
        [skipped(0, GAP), fired(0)],
        at(0),
        at(0),
        at(1),
        None,
        [at(0)],
        [],
        False,
    ),
    "ends_at passed disables and clears next_fire_at": (
        [fired(0)],
        at(0),
        at(0.5),
        None,
        at(0.25),
        [at(0)],
        [],
        True,
    ),
    "no next fire before ends_at disables at the last fire": (
        [fired(0)],
        at(0),
        at(0),
        None,
        at(10),
        [at(0)],
        [],
        True,
    ),
    "no next fire without ends_at stays enabled": (
        [fired(0)],
        at(0),
        at(0),
        None,
        None,
        [at(0)],
        [],
        False,
    ),
}


@pytest.mark.parametrize(
    ("ticks", "due_from", "now", "next_fire_at", "ends_at", "fires", "skips", "disable"),
    list(CASES.values()),
    ids=list(CASES),
)
def test_plan_ticks(ticks, due_from, now, next_fire_at, ends_at, fires, skips, disable):
    """Each raw tick becomes a fire, a recorded skip, or nothing, per the catch-up rules."""
    plan = plan_ticks(
        ticks,
        due_from=due_from,
        scanned_after=min(t.fire_at for t in ticks) - timedelta(seconds=1),
        now=now,
        max_lateness=LATENESS,
        next_fire_at=next_fire_at,
        last_fire_at=None,
        ends_at=ends_at,
    )
    assert list(plan.fires) == fires
    assert list(plan.skips) == skips
    assert plan.disable is disable
    assert plan.next_fire_at == (None if disable else next_fire_at)
    assert plan.last_fire_at == (fires[-1] if fires else None)


def test_last_fire_at_is_kept_when_nothing_fires():
    """A pass that only records skips leaves last_fire_at as it was."""
    plan = plan_ticks(
        [fired(0)],
        due_from=at(0),
        scanned_after=at(-1),
        now=at(5),
        max_lateness=LATENESS,
        next_fire_at=at(24),
        last_fire_at=at(-24),
        ends_at=None,
    )
    assert plan.fires == ()
    assert plan.last_fire_at == at(-24)
    assert plan.missed == 1


def test_skips_are_bounded_keeping_the_gap_start_and_the_latest():
    """Beyond max_skips, the earliest and the most recent skips are written, the rest counted."""
    ticks = [fired(h) for h in range(50)]
    plan = plan_ticks(
        ticks,
        due_from=at(0),
        scanned_after=at(-1),
        now=at(49),
        max_lateness=LATENESS,
        next_fire_at=at(50),
        last_fire_at=None,
        ends_at=None,
        max_skips=5,
    )
    assert plan.fires == (at(48), at(49))
    assert [s.fire_at for s in plan.skips] == [at(0), at(44), at(45), at(46), at(47)]
    assert plan.missed == 48
    assert plan.unitemised == 48 - 5


def test_truncated_scan_records_the_first_missed_tick():
    """After an outage longer than the scan horizon, next_fire_at is recorded as the gap start."""
    now = at(24 * 30)
    after = scan_after(
        due_from=at(0),
        handled_until=at(-1),
        now=now,
        max_lateness=LATENESS,
        skip_horizon=timedelta(days=2),
    )
    assert after == now - LATENESS - timedelta(days=2)
    plan = plan_ticks(
        [fired(24 * 30 - 2), fired(24 * 30)],
        due_from=at(0),
        scanned_after=after,
        now=now,
        max_lateness=LATENESS,
        next_fire_at=at(24 * 30 + 1),
        last_fire_at=None,
        ends_at=None,
    )
    assert plan.truncated
    assert plan.fires == (now,)
    assert plan.skips == (
        Skip(at(0), MISSED_MAX_LATENESS),
        Skip(at(24 * 30 - 2), MISSED_MAX_LATENESS),
    )


@pytest.mark.parametrize(
    ("handled_until", "expected"),
    [
        (None, at(0) - timedelta(microseconds=1)),
        (at(-3), at(-3)),
        (at(2), at(0) - timedelta(microseconds=1)),
    ],
    ids=["nothing handled yet", "skips since the last fire are scanned", "never after due_from"],
)
def test_scan_after(handled_until, expected):
    """The scan starts at the last handled instant but never skips next_fire_at."""
    assert (
        scan_after(due_from=at(0), handled_until=handled_until, now=at(0), max_lateness=LATENESS)
        == expected
    )


def test_fire_id_is_deterministic_and_zone_independent():
    """The same (schedule, instant) gives the same id whatever zone the instant is written in."""
    from zoneinfo import ZoneInfo

    local = T0.astimezone(ZoneInfo("Asia/Singapore"))
    assert fire_id("sch_1", T0) == fire_id("sch_1", local)
    assert fire_id("sch_1", T0) != fire_id("sch_2", T0)
    assert fire_id("sch_1", T0).startswith("fire_")
    assert len(fire_id("sch_1", T0)) == 29


FAST_PATH_CADENCES = [
    {"simple": {"frequency": "daily", "times": ["02:30", "09:00"]}},
    {"simple": {"frequency": "weekly", "times": ["01:30"], "days_of_week": ["sun"]}},
    {"simple": {"frequency": "interval_hours", "interval_hours": 5}},
    {"cron": "15 */3 * * *"},
]
FAST_PATH_ZONES = ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata"]


@pytest.mark.parametrize("zone", FAST_PATH_ZONES)
@pytest.mark.parametrize("cadence", FAST_PATH_CADENCES, ids=lambda c: json.dumps(c))
def test_fast_tick_walk_equals_the_cadence_engine(cadence, zone):
    """The next_fire walk used without a window equals ticks_between + next_fire, DST included."""
    compiled = compile_schedule(
        {**cadence, "timezone": zone}, created_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    # Probes through 2026; the 6-day spans cross every spring and autumn transition.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for step in range(0, 365 * 24, 31):
        after = start + timedelta(hours=step)
        for span in (timedelta(minutes=1), timedelta(hours=30), timedelta(days=6)):
            now = after + span
            ticks, following = _ticks_and_next(compiled, after, now)
            assert ticks == ticks_between(compiled, after, now), (after, now)
            assert following == next_fire(compiled, now)


@pytest.mark.parametrize(
    ("cadence", "starts_at", "ends_at", "anchor_at"),
    [
        (
            {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"},
            None,
            None,
            datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC),
        ),
        (
            {"simple": {"frequency": "interval_hours", "interval_hours": 4}, "timezone": "UTC"},
            datetime(2026, 2, 1, 7, 3, 1, tzinfo=UTC),
            datetime(2026, 3, 1, tzinfo=UTC),
            datetime(2026, 1, 5, tzinfo=UTC),
        ),
        (
            {"cron": "0 9 * * 1-5", "timezone": "Europe/Berlin"},
            None,
            datetime(2027, 1, 1, tzinfo=UTC),
            datetime(2026, 1, 7, 11, 59, 59, tzinfo=UTC),
        ),
    ],
    ids=["daily", "interval with bounds", "cron with ends_at"],
)
def test_compiled_cache_template_path_equals_a_full_compile(cadence, starts_at, ends_at, anchor_at):
    """A cadence compiled once and re-bounded per row equals compiling that row from scratch."""
    window = {"hours": {"start": "08:00", "end": "20:00"}}

    def row(
        schedule_id: str, starts: datetime | None, ends: datetime | None, anchor: datetime
    ) -> Any:
        return SimpleNamespace(
            id=schedule_id,
            version=1,
            cadence_json=json.dumps(cadence),
            active_window_json=json.dumps(window),
            timezone=cadence["timezone"],
            starts_at=starts,
            ends_at=ends,
            anchor_at=anchor,
        )

    cache = CompiledCache()
    cache.compiled(row("sch_first", None, None, datetime(2025, 12, 31, tzinfo=UTC)))
    via_template = cache.compiled(row("sch_second", starts_at, ends_at, anchor_at))
    assert cache.template_hits == 1
    direct = compile_schedule(
        cadence, window, starts_at=starts_at, ends_at=ends_at, created_at=anchor_at
    )
    assert via_template == direct
