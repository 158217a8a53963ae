"""
Named DST cases: spring-forward gaps are skipped, fall-back folds fire once (invariant 1).

Fires are compared as local RFC 3339 strings with their offset, which pins both
the wall time and which occurrence of it (aware-datetime equality is computed
in UTC and would hide a wrong fold).
"""

from datetime import timedelta

import pytest

from delivery.cadence import SkipReason, compile_schedule, next_fire, ticks_between
from tests.cadence.helpers import CREATED, cron, daily, local_fires, utc

# (zone, times, after (UTC), expected local fires)
GAP_CASES = [
    (
        "America/New_York",
        ["02:30"],
        "2026-03-06T12:00",
        ["2026-03-07T02:30:00-05:00", "2026-03-09T02:30:00-04:00"],
    ),
    (
        "Europe/London",
        ["01:30"],
        "2026-03-27T12:00",
        ["2026-03-28T01:30:00+00:00", "2026-03-30T01:30:00+01:00"],
    ),
    (
        "Europe/Berlin",
        ["02:00", "03:00"],
        "2026-03-28T12:00",
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:00:00+02:00"],
    ),
    (
        "Australia/Lord_Howe",
        ["02:15"],
        "2026-10-02T12:00",
        ["2026-10-03T02:15:00+10:30", "2026-10-05T02:15:00+11:00"],
    ),
    (
        "Pacific/Chatham",
        ["03:00"],
        "2026-09-25T00:00",
        ["2026-09-26T03:00:00+12:45", "2026-09-28T03:00:00+13:45"],
    ),
    (
        "America/Santiago",
        ["00:00", "00:30"],
        "2026-09-05T00:00",
        ["2026-09-05T00:00:00-04:00", "2026-09-05T00:30:00-04:00", "2026-09-07T00:00:00-03:00"],
    ),
    (
        "Europe/Dublin",
        ["01:30"],
        "2026-03-27T12:00",
        ["2026-03-28T01:30:00+00:00", "2026-03-30T01:30:00+01:00"],
    ),
    (
        "Pacific/Apia",
        ["09:00"],
        "2011-12-28T20:00",
        ["2011-12-29T09:00:00-10:00", "2011-12-31T09:00:00+14:00"],
    ),
]
GAP_IDS = [
    "us-spring-gap-new-york",
    "eu-spring-gap-london",
    "eu-spring-gap-berlin-02:00-skipped-03:00-kept",
    "lord-howe-30min-gap",
    "chatham-02:45-gap",
    "santiago-midnight-gap",
    "dublin-negative-dst-spring",
    "apia-skips-2011-12-30",
]


@pytest.mark.parametrize(("zone", "times", "after", "expected"), GAP_CASES, ids=GAP_IDS)
def test_gap_wall_time_is_skipped(
    zone: str, times: list[str], after: str, expected: list[str]
) -> None:
    """A wall time inside the spring-forward gap produces no fire that day."""
    assert local_fires(daily(zone, *times), after, len(expected)) == expected


FOLD_CASES = [
    (
        "America/New_York",
        "01:30",
        "2026-10-31T12:00",
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    ),
    (
        "Europe/London",
        "01:30",
        "2026-10-24T12:00",
        ["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"],
    ),
    (
        "Europe/Berlin",
        "02:30",
        "2026-10-24T12:00",
        ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"],
    ),
    (
        "Australia/Lord_Howe",
        "01:45",
        "2026-04-04T00:00",
        ["2026-04-05T01:45:00+11:00", "2026-04-06T01:45:00+10:30"],
    ),
    (
        "Pacific/Chatham",
        "03:00",
        "2026-04-04T12:00",
        ["2026-04-05T03:00:00+13:45", "2026-04-06T03:00:00+12:45"],
    ),
    (
        "America/Santiago",
        "23:30",
        "2026-04-03T12:00",
        ["2026-04-03T23:30:00-03:00", "2026-04-04T23:30:00-03:00", "2026-04-05T23:30:00-04:00"],
    ),
    (
        "Europe/Dublin",
        "01:30",
        "2026-10-24T12:00",
        ["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"],
    ),
]
FOLD_IDS = [
    "us-fall-fold-new-york",
    "eu-fall-fold-london",
    "eu-fall-fold-berlin",
    "lord-howe-30min-fold",
    "chatham-fold",
    "santiago-midnight-fold",
    "dublin-negative-dst-fold",
]


@pytest.mark.parametrize(("zone", "time", "after", "expected"), FOLD_CASES, ids=FOLD_IDS)
def test_fold_wall_time_fires_once_at_first_occurrence(
    zone: str, time: str, after: str, expected: list[str]
) -> None:
    """A wall time repeated at fall-back fires once, with the earlier (summer) offset."""
    assert local_fires(daily(zone, time), after, len(expected)) == expected


@pytest.mark.parametrize(
    ("zone", "time", "inside_second_pass", "expected"),
    [
        ("America/New_York", "01:30", "2026-11-01T06:10", "2026-11-02T01:30:00-05:00"),
        ("Europe/London", "01:30", "2026-10-25T01:10", "2026-10-26T01:30:00+00:00"),
        ("Australia/Lord_Howe", "01:45", "2026-04-04T15:05", "2026-04-06T01:45:00+10:30"),
    ],
    ids=["new-york", "london", "lord-howe"],
)
def test_asking_during_second_pass_of_fold_does_not_refire(
    zone: str, time: str, inside_second_pass: str, expected: str
) -> None:
    """Asked between the two occurrences, the repeated wall time is not fired again."""
    schedule = daily(zone, time)
    fire = next_fire(schedule, utc(inside_second_pass))
    assert fire is not None
    assert fire.astimezone(schedule.zone).isoformat() == expected


def test_cron_every_15_minutes_through_fold_fires_each_wall_time_once() -> None:
    """`*/15 1 * * *` over the London fold gives 01:00..01:45 once, all at +01:00."""
    schedule = cron("Europe/London", "*/15 1 * * *")
    assert local_fires(schedule, "2026-10-24T23:00", 5) == [
        "2026-10-25T01:00:00+01:00",
        "2026-10-25T01:15:00+01:00",
        "2026-10-25T01:30:00+01:00",
        "2026-10-25T01:45:00+01:00",
        "2026-10-26T01:00:00+00:00",
    ]


def test_gap_tick_is_reported_with_its_fold0_instant() -> None:
    """ticks_between shows the skipped gap tick as DST_GAP, at the fold=0 instant."""
    schedule = daily("America/New_York", "02:30", "09:00")
    ticks = ticks_between(schedule, utc("2026-03-08T05:00"), utc("2026-03-08T14:00"))
    rows = [(t.local.isoformat(), t.fire_at.isoformat(), t.skipped) for t in ticks]
    assert rows == [
        ("2026-03-08T02:30:00", "2026-03-08T07:30:00+00:00", SkipReason.DST_GAP),
        ("2026-03-08T09:00:00", "2026-03-08T13:00:00+00:00", None),
    ]


def test_apia_whole_skipped_day_reports_gap_ticks() -> None:
    """Every tick on Apia's missing 2011-12-30 is a DST_GAP tick, at its fold=0 (-10) instant."""
    schedule = daily("Pacific/Apia", "09:00", "21:00")
    ticks = ticks_between(schedule, utc("2011-12-29T20:00"), utc("2011-12-31T08:00"))
    rows = [(t.fire_at.isoformat(), t.local.isoformat(), t.skipped) for t in ticks]
    # The skipped day's fold=0 instants coincide with the next day's real ticks.
    assert rows == [
        ("2011-12-30T07:00:00+00:00", "2011-12-29T21:00:00", None),
        ("2011-12-30T19:00:00+00:00", "2011-12-30T09:00:00", SkipReason.DST_GAP),
        ("2011-12-30T19:00:00+00:00", "2011-12-31T09:00:00", None),
        ("2011-12-31T07:00:00+00:00", "2011-12-30T21:00:00", SkipReason.DST_GAP),
        ("2011-12-31T07:00:00+00:00", "2011-12-31T21:00:00", None),
    ]


def test_interval_hours_counts_elapsed_time_across_spring_gap() -> None:
    """Every 24 hours of elapsed time moves from 09:00 EST to 10:00 EDT."""
    schedule = compile_schedule(
        {
            "simple": {"frequency": "interval_hours", "interval_hours": 24},
            "timezone": "America/New_York",
        },
        starts_at=utc("2026-03-07T14:00"),
        created_at=CREATED,
    )
    assert local_fires(schedule, "2026-03-07T00:00", 3) == [
        "2026-03-07T09:00:00-05:00",
        "2026-03-08T10:00:00-04:00",
        "2026-03-09T10:00:00-04:00",
    ]


def test_interval_hours_fires_both_instants_of_a_fold() -> None:
    """Hourly elapsed time shows 01:00 twice at fall-back: they are distinct instants."""
    schedule = compile_schedule(
        {
            "simple": {"frequency": "interval_hours", "interval_hours": 1},
            "timezone": "America/New_York",
        },
        starts_at=utc("2026-11-01T04:00"),
        created_at=CREATED,
    )
    assert local_fires(schedule, "2026-11-01T00:00", 4) == [
        "2026-11-01T00:00:00-04:00",
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T02:00:00-05:00",
    ]


def test_fire_set_does_not_depend_on_when_you_ask() -> None:
    """Walking next_fire from any point through a transition week yields the same fires."""
    schedule = cron("Australia/Lord_Howe", "0,30 1-2 * * *")
    start = utc("2026-10-01T00:00")
    reference = []
    cursor = start
    while (fire := next_fire(schedule, cursor)) is not None and fire < start + timedelta(days=6):
        reference.append(fire)
        cursor = fire
    for minutes in range(0, 6 * 1440, 97):
        probe = start + timedelta(minutes=minutes)
        expected = next((f for f in reference if f > probe), None)
        if expected is not None:
            assert next_fire(schedule, probe) == expected
