"""
Example tables for cadence rules, the active window and starts_at / ends_at bounds.

Fires are compared as local RFC 3339 strings in the schedule's zone.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from croniter import croniter

from delivery.cadence import (
    CompiledSchedule,
    SkipReason,
    compile_schedule,
    format_local,
    format_utc,
    next_fire,
    parse_instant,
    ticks_between,
    upcoming,
)
from tests.cadence.helpers import CREATED, cron, daily, local_fires, utc


def simple(zone: str, window: Any = None, **simple_fields: Any) -> CompiledSchedule:
    return compile_schedule({"simple": simple_fields, "timezone": zone}, window, created_at=CREATED)


@pytest.mark.parametrize(
    ("schedule", "after", "expected"),
    [
        (
            daily("Asia/Singapore", "09:00"),
            "2026-05-01T12:00",
            ["2026-05-02T09:00:00+08:00", "2026-05-03T09:00:00+08:00"],
        ),
        (
            daily("Asia/Singapore", "20:00", "08:00"),
            "2026-05-01T00:00",
            ["2026-05-01T20:00:00+08:00", "2026-05-02T08:00:00+08:00", "2026-05-02T20:00:00+08:00"],
        ),
        (
            simple(
                "Europe/Paris", frequency="weekly", times=["07:00"], days_of_week=["sun", "wed"]
            ),
            "2026-06-01T00:00",  # a Monday
            ["2026-06-03T07:00:00+02:00", "2026-06-07T07:00:00+02:00", "2026-06-10T07:00:00+02:00"],
        ),
        (
            daily("UTC", "00:00"),
            "2026-05-01T00:00",  # strictly after: midnight itself is not next
            ["2026-05-02T00:00:00+00:00"],
        ),
        (
            daily("Asia/Kolkata", "23:59"),
            "2026-12-31T18:28",
            ["2026-12-31T23:59:00+05:30", "2027-01-01T23:59:00+05:30"],
        ),
    ],
    ids=[
        "daily-one-time",
        "daily-two-times-unsorted",
        "weekly-sun-wed",
        "strictly-after",
        "year-end",
    ],
)
def test_simple_wall_clock_cadences(
    schedule: CompiledSchedule, after: str, expected: list[str]
) -> None:
    """daily and weekly fire at each listed wall time on each allowed local day."""
    assert local_fires(schedule, after, len(expected)) == expected


def test_weekly_day_is_the_local_day() -> None:
    """A Saturday 09:00 in Auckland is Friday in UTC, and still counts as Saturday."""
    schedule = simple("Pacific/Auckland", frequency="weekly", times=["09:00"], days_of_week=["sat"])
    assert local_fires(schedule, "2026-06-01T00:00", 2) == [
        "2026-06-06T09:00:00+12:00",
        "2026-06-13T09:00:00+12:00",
    ]


def test_interval_hours_from_starts_at_with_window_matches_seed_example() -> None:
    """Seeds 001: every 4 hours from 08:00 SGT with an 08:00-22:00 window gives 08, 12, 16, 20."""
    schedule = compile_schedule(
        {
            "simple": {"frequency": "interval_hours", "interval_hours": 4},
            "timezone": "Asia/Singapore",
        },
        {"hours": {"start": "08:00", "end": "22:00"}},
        starts_at=utc("2026-05-01T00:00"),
        ends_at=utc("2026-05-14T23:59:59"),
        created_at=utc("2026-04-20T00:00"),
    )
    assert local_fires(schedule, "2026-04-25T00:00", 5) == [
        "2026-05-01T08:00:00+08:00",
        "2026-05-01T12:00:00+08:00",
        "2026-05-01T16:00:00+08:00",
        "2026-05-01T20:00:00+08:00",
        "2026-05-02T08:00:00+08:00",
    ]


def test_interval_hours_anchors_on_created_at_rounded_up_to_the_minute() -> None:
    """Without starts_at the anchor is created_at rounded up to the whole minute."""
    created = datetime(2026, 5, 1, 10, 0, 27, 500_000, tzinfo=UTC)
    schedule = compile_schedule(
        {"simple": {"frequency": "interval_hours", "interval_hours": 6}, "timezone": "UTC"},
        created_at=created,
    )
    assert schedule.anchor == utc("2026-05-01T10:01")
    assert [format_utc(f) for f in upcoming(schedule, created, 3)] == [
        "2026-05-01T10:01:00Z",
        "2026-05-01T16:01:00Z",
        "2026-05-01T22:01:00Z",
    ]


CRON_CASES = [
    (
        "0 9 * * 1-5",
        "2026-05-01T00:00",
        ["2026-05-01T09:00", "2026-05-04T09:00", "2026-05-05T09:00"],
    ),
    (
        "0 9 * * MON-FRI",
        "2026-05-01T00:00",
        ["2026-05-01T09:00", "2026-05-04T09:00", "2026-05-05T09:00"],
    ),
    (
        "0 9 1 * MON",
        "2026-05-30T00:00",
        ["2026-06-01T09:00", "2026-06-08T09:00", "2026-06-15T09:00"],
    ),
    (
        "0 9 15 * 5",
        "2026-05-13T00:00",
        ["2026-05-15T09:00", "2026-05-22T09:00", "2026-05-29T09:00"],
    ),
    (
        "0 9 */2 * MON",
        "2026-06-01T00:00",
        ["2026-06-01T09:00", "2026-06-15T09:00", "2026-06-29T09:00"],
    ),
    ("0 9 1 * *", "2026-05-02T00:00", ["2026-06-01T09:00", "2026-07-01T09:00"]),
    ("30 6 * * 0", "2026-05-01T00:00", ["2026-05-03T06:30", "2026-05-10T06:30"]),
    ("30 6 * * 7", "2026-05-01T00:00", ["2026-05-03T06:30", "2026-05-10T06:30"]),
    ("30 6 * * sun", "2026-05-01T00:00", ["2026-05-03T06:30", "2026-05-10T06:30"]),
    ("0 12 1 JAN,jul *", "2026-05-01T00:00", ["2026-07-01T12:00", "2027-01-01T12:00"]),
    (
        "0 8-18/5 * * *",
        "2026-05-01T00:00",
        ["2026-05-01T08:00", "2026-05-01T13:00", "2026-05-01T18:00"],
    ),
    (
        "*/20 10 * * *",
        "2026-05-01T10:10",
        ["2026-05-01T10:20", "2026-05-01T10:40", "2026-05-02T10:00"],
    ),
    ("0 0 29 2 *", "2026-01-01T00:00", ["2028-02-29T00:00", "2032-02-29T00:00"]),
    ("0 9 31 * *", "2026-04-01T00:00", ["2026-05-31T09:00", "2026-07-31T09:00"]),
    ("0 9 30 2 1", "2026-01-28T00:00", ["2026-02-02T09:00", "2026-02-09T09:00"]),
    (
        "5,10 0-1 * * *",
        "2026-05-01T00:06",
        ["2026-05-01T00:10", "2026-05-01T01:05", "2026-05-01T01:10"],
    ),
]
CRON_IDS = [
    "weekdays-numeric",
    "weekdays-names",
    "dom-or-dow-when-both-restricted",
    "dom-or-dow-friday-15th",
    "dom-star-step-means-and",
    "first-of-month",
    "sunday-as-0",
    "sunday-as-7",
    "sunday-lowercase-name",
    "month-names-mixed-case",
    "hour-range-with-step",
    "minute-step",
    "leap-day",
    "31st-skips-short-months",
    "impossible-dom-but-dow-or",
    "lists",
]


@pytest.mark.parametrize(("expression", "after", "expected"), CRON_CASES, ids=CRON_IDS)
def test_cron_vixie_semantics(expression: str, after: str, expected: list[str]) -> None:
    """5-field cron follows Vixie cron, including the day-of-month / day-of-week OR rule."""
    schedule = cron("UTC", expression)
    assert [
        f.strftime("%Y-%m-%dT%H:%M") for f in upcoming(schedule, utc(after), len(expected))
    ] == expected


@pytest.mark.parametrize(
    "expression",
    [
        "0 9 * * 1-5",
        "30 8 * * 1-5",
        "0 9 1 * MON",
        "0 8-18/5 * * *",
        "0 0 29 2 *",
        "15 */6 1-7 * *",
    ],
)
def test_cron_agrees_with_croniter_where_dst_is_not_involved(expression: str) -> None:
    """In a zone without DST our fires equal croniter's for a year of standard expressions."""
    schedule = cron("Asia/Tokyo", expression)
    start = datetime(2026, 1, 1, tzinfo=schedule.zone)
    it = croniter(expression, start)
    ours = upcoming(schedule, start, 60)
    theirs = [it.get_next(datetime) for _ in range(60)]
    assert [format_local(f, schedule.zone) for f in ours] == [t.isoformat() for t in theirs]


WINDOW_CASES = [
    (
        {"hours": {"start": "08:00", "end": "22:00"}},
        ["07:59", "08:00", "21:59", "22:00"],
        ["08:00", "21:59"],
    ),
    (
        {"hours": {"start": "22:00", "end": "06:00"}},
        ["05:59", "06:00", "12:00", "21:59", "22:00", "23:30"],
        ["05:59", "22:00", "23:30"],
    ),
    (
        {"hours": {"start": "21:00", "end": "07:00"}},
        ["08:00", "20:00", "22:00"],
        ["22:00"],
    ),
]


@pytest.mark.parametrize(
    ("window", "times", "kept"),
    WINDOW_CASES,
    ids=["day-window", "wrap-midnight", "seed-quiet-hours"],
)
def test_window_hours_start_inclusive_end_exclusive(
    window: dict[str, Any], times: list[str], kept: list[str]
) -> None:
    """A tick at start fires, a tick at end is skipped; start > end wraps midnight."""
    schedule = daily("Asia/Singapore", *times, window=window)
    fires = upcoming(schedule, utc("2026-05-01T16:00"), len(kept))  # 00:00 SGT
    assert [f.astimezone(schedule.zone).strftime("%H:%M") for f in fires] == sorted(kept)


def test_window_skips_never_defers() -> None:
    """A tick outside the window is dropped; the next fire is the next in-window tick."""
    schedule = daily(
        "Asia/Singapore", "07:00", "09:00", window={"hours": {"start": "08:00", "end": "10:00"}}
    )
    assert local_fires(schedule, "2026-04-30T22:00", 2) == [
        "2026-05-01T09:00:00+08:00",
        "2026-05-02T09:00:00+08:00",
    ]


def test_window_day_membership_is_the_fires_own_local_weekday() -> None:
    """With a wrapping 22:00-06:00 window on Fridays, Saturday 02:00 is a Saturday fire: skipped."""
    schedule = daily(
        "Asia/Singapore",
        "02:00",
        "23:00",
        window={"hours": {"start": "22:00", "end": "06:00"}, "days_of_week": ["fri"]},
    )
    # Friday 02:00 is a Friday fire inside the wrapped window, so it fires too.
    assert local_fires(schedule, "2026-05-01T00:00", 3) == [
        "2026-05-01T23:00:00+08:00",
        "2026-05-08T02:00:00+08:00",
        "2026-05-08T23:00:00+08:00",
    ]
    ticks = ticks_between(schedule, utc("2026-05-01T14:00"), utc("2026-05-01T19:00"))
    assert [(t.local.isoformat(), t.skipped) for t in ticks] == [
        ("2026-05-01T23:00:00", None),
        ("2026-05-02T02:00:00", SkipReason.OUTSIDE_ACTIVE_WINDOW),
    ]


def test_window_that_filters_everything_means_no_next_fire() -> None:
    """A window no tick can satisfy is allowed and simply yields no fires."""
    schedule = simple(
        "UTC",
        window={"days_of_week": ["sat"]},
        frequency="weekly",
        times=["09:00"],
        days_of_week=["mon"],
    )
    assert next_fire(schedule, utc("2026-05-01T00:00")) is None
    assert upcoming(schedule, utc("2026-05-01T00:00"), 3) == []


def test_interval_window_uses_the_shifting_local_time() -> None:
    """An interval's window check uses each fire's own local wall time and weekday."""
    schedule = compile_schedule(
        {"simple": {"frequency": "interval_hours", "interval_hours": 5}, "timezone": "UTC"},
        {"hours": {"start": "09:00", "end": "17:00"}, "days_of_week": ["mon"]},
        starts_at=utc("2026-06-01T00:00"),
        created_at=CREATED,
    )
    fires = [format_utc(f) for f in upcoming(schedule, utc("2026-05-30T00:00"), 3)]
    assert fires == ["2026-06-01T10:00:00Z", "2026-06-01T15:00:00Z", "2026-06-08T12:00:00Z"]


BOUND_CASES = [
    (
        {"starts_at": utc("2026-05-03T01:00"), "ends_at": utc("2026-05-04T00:00")},
        "2026-05-01T00:00",
        ["2026-05-03T09:00:00+08:00"],
    ),
    (
        {"starts_at": utc("2026-05-03T01:00:01"), "ends_at": utc("2026-05-05T00:00")},
        "2026-05-01T00:00",
        ["2026-05-04T09:00:00+08:00"],
    ),
    ({"ends_at": utc("2026-05-03T01:00")}, "2026-05-01T12:00", ["2026-05-02T09:00:00+08:00"]),
    (
        {"ends_at": utc("2026-05-03T01:00:01")},
        "2026-05-01T12:00",
        ["2026-05-02T09:00:00+08:00", "2026-05-03T09:00:00+08:00"],
    ),
]


@pytest.mark.parametrize(
    ("bounds", "after", "expected"),
    BOUND_CASES,
    ids=[
        "starts-at-inclusive",
        "starts-at-one-second-late",
        "ends-at-exclusive",
        "ends-at-one-second-after",
    ],
)
def test_starts_at_inclusive_ends_at_exclusive(
    bounds: dict[str, Any], after: str, expected: list[str]
) -> None:
    """No fire before starts_at, a fire exactly at starts_at, none at or after ends_at."""
    schedule = daily("Asia/Singapore", "09:00", **bounds)
    assert local_fires(schedule, after, 10) == expected


def test_ticks_between_respects_bounds_and_reports_window_skips() -> None:
    """Raw ticks outside [starts_at, ends_at) are not ticks; window skips are labelled."""
    schedule = daily(
        "UTC",
        "06:00",
        "12:00",
        window={"hours": {"start": "09:00", "end": "18:00"}},
        starts_at=utc("2026-05-01T12:00"),
        ends_at=utc("2026-05-02T12:00"),
    )
    ticks = ticks_between(schedule, utc("2026-04-30T00:00"), utc("2026-05-05T00:00"))
    assert [(format_utc(t.fire_at), t.skipped) for t in ticks] == [
        ("2026-05-01T12:00:00Z", None),
        ("2026-05-02T06:00:00Z", SkipReason.OUTSIDE_ACTIVE_WINDOW),
    ]


def test_upcoming_limit_and_end() -> None:
    """upcoming returns at most limit fires and stops at ends_at."""
    schedule = daily("UTC", "09:00", ends_at=utc("2026-05-04T00:00"))
    assert len(upcoming(schedule, utc("2026-05-01T00:00"), 2)) == 2
    assert len(upcoming(schedule, utc("2026-05-01T00:00"), 10)) == 3
    assert upcoming(schedule, utc("2026-05-01T00:00"), 0) == []
    assert next_fire(schedule, utc("2026-05-03T09:00")) is None


def test_far_future_and_naive_inputs() -> None:
    """Searching near year 9999 ends cleanly; naive instants are refused."""
    schedule = daily("UTC", "09:00")
    assert next_fire(schedule, datetime(9999, 12, 31, 10, tzinfo=UTC)) is None
    with pytest.raises(ValueError, match="aware"):
        next_fire(schedule, datetime(2026, 1, 1))  # noqa: DTZ001
    with pytest.raises(ValueError, match="aware"):
        ticks_between(schedule, utc("2026-01-01T00:00"), datetime(2026, 1, 2))  # noqa: DTZ001


def test_normalised_cadence_and_window() -> None:
    """The stored objects are normalised: sorted times and days, {} window is no window."""
    schedule = compile_schedule(
        {
            "timezone": "Asia/Singapore",
            "simple": {
                "frequency": "weekly",
                "times": ["20:00", "08:00"],
                "days_of_week": ["fri", "mon"],
            },
        },
        {},
        created_at=CREATED,
    )
    assert schedule.cadence == {
        "simple": {
            "frequency": "weekly",
            "times": ["08:00", "20:00"],
            "days_of_week": ["mon", "fri"],
        },
        "timezone": "Asia/Singapore",
    }
    assert schedule.active_window is None
    assert schedule.cadence_type == "simple"
    windowed = daily(
        "UTC",
        "09:00",
        window={"days_of_week": ["sun", "mon", "sun"], "hours": {"start": "08:00", "end": "22:00"}},
    )
    assert windowed.active_window == {
        "hours": {"start": "08:00", "end": "22:00"},
        "days_of_week": ["mon", "sun"],
    }
    assert cron("UTC", "  0   9 * *  MON-FRI ").cadence == {
        "cron": "0 9 * * MON-FRI",
        "timezone": "UTC",
    }


def test_format_and_parse_instants() -> None:
    """RFC 3339 in and out: Z for UTC, the zone's offset for local."""
    instant = parse_instant("2026-05-02T09:00:00+08:00", "starts_at")
    assert instant == datetime(2026, 5, 2, 1, tzinfo=UTC)
    assert instant.tzinfo is UTC
    assert format_utc(instant) == "2026-05-02T01:00:00Z"
    assert (
        format_local(instant, daily("Asia/Singapore", "09:00").zone) == "2026-05-02T09:00:00+08:00"
    )
    assert parse_instant("2026-05-01T00:00:00.123456789Z", "x") == datetime(
        2026, 5, 1, 0, 0, 0, 123456, tzinfo=UTC
    )
    assert format_utc(datetime(2026, 5, 1, 0, 0, 0, 5, tzinfo=UTC)) == "2026-05-01T00:00:00.000005Z"
    assert parse_instant("2026-05-01t00:00:00z", "x") + timedelta(0) == utc("2026-05-01T00:00")
