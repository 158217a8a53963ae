"""
Validation: every error code, with the offending field named, and no crash on any JSON input.
"""

from datetime import timedelta
from typing import Any

import pytest
from croniter import croniter
from hypothesis import given
from hypothesis import strategies as st

from delivery.cadence import compile_schedule, parse_instant
from delivery.cadence.cron import parse_cron
from delivery.errors import (
    BadRequestError,
    CadenceTooDenseError,
    CadenceTooFrequentError,
    InvalidActiveWindowError,
    InvalidCadenceError,
    InvalidRequestError,
    InvalidTimezoneError,
    InvalidWindowError,
)
from tests.cadence.helpers import CREATED, utc

DAILY = {"frequency": "daily", "times": ["09:00"]}


def _error(cadence: Any, window: Any = None, **kwargs: Any) -> BadRequestError:
    with pytest.raises(BadRequestError) as info:
        compile_schedule(cadence, window, created_at=kwargs.pop("created_at", CREATED), **kwargs)
    return info.value


TIMEZONE_CASES = [
    ({"simple": DAILY, "timezone": "+08:00"}, "offset"),
    ({"simple": DAILY, "timezone": "UTC+8"}, "utc-plus"),
    ({"simple": DAILY, "timezone": "asia/singapore"}, "wrong-case"),
    ({"simple": DAILY, "timezone": "Mars/Olympus_Mons"}, "unknown"),
    ({"simple": DAILY, "timezone": ""}, "empty"),
    ({"simple": DAILY, "timezone": 8}, "number"),
    ({"simple": DAILY, "timezone": "../../etc/passwd"}, "path"),
    ({"simple": DAILY}, "missing"),
]


@pytest.mark.parametrize(
    "cadence", [c for c, _ in TIMEZONE_CASES], ids=[i for _, i in TIMEZONE_CASES]
)
def test_invalid_timezone(cadence: dict[str, Any]) -> None:
    """Only exact IANA names are zones: INVALID_TIMEZONE naming cadence.timezone."""
    error = _error(cadence)
    assert isinstance(error, InvalidTimezoneError)
    assert (error.code, error.field) == ("INVALID_TIMEZONE", "cadence.timezone")
    assert "cadence.timezone" in error.message


@pytest.mark.parametrize(
    "zone", ["UTC", "Asia/Singapore", "America/Argentina/Buenos_Aires", "Etc/GMT-8"]
)
def test_valid_timezones(zone: str) -> None:
    """IANA names, including UTC and Etc/ zones, are accepted verbatim."""
    assert (
        compile_schedule({"simple": DAILY, "timezone": zone}, created_at=CREATED).timezone == zone
    )


CADENCE_CASES = [
    ("not-an-object", "daily at nine", "cadence"),
    ("neither-shape", {"timezone": "UTC"}, "cadence"),
    ("both-shapes", {"simple": DAILY, "cron": "0 9 * * *", "timezone": "UTC"}, "cadence"),
    ("unknown-key", {"simple": DAILY, "timezone": "UTC", "every": 3}, "cadence.every"),
    ("simple-not-object", {"simple": ["daily"], "timezone": "UTC"}, "cadence.simple"),
    (
        "unknown-frequency",
        {"simple": {"frequency": "hourly"}, "timezone": "UTC"},
        "cadence.simple.frequency",
    ),
    (
        "missing-frequency",
        {"simple": {"times": ["09:00"]}, "timezone": "UTC"},
        "cadence.simple.frequency",
    ),
    (
        "daily-with-days",
        {"simple": {**DAILY, "days_of_week": ["mon"]}, "timezone": "UTC"},
        "cadence.simple.days_of_week",
    ),
    (
        "daily-with-interval",
        {"simple": {**DAILY, "interval_hours": 2}, "timezone": "UTC"},
        "cadence.simple.interval_hours",
    ),
    (
        "interval-with-times",
        {
            "simple": {"frequency": "interval_hours", "interval_hours": 2, "times": ["09:00"]},
            "timezone": "UTC",
        },
        "cadence.simple.times",
    ),
    (
        "missing-times",
        {"simple": {"frequency": "daily"}, "timezone": "UTC"},
        "cadence.simple.times",
    ),
    (
        "empty-times",
        {"simple": {"frequency": "daily", "times": []}, "timezone": "UTC"},
        "cadence.simple.times",
    ),
    (
        "times-not-list",
        {"simple": {"frequency": "daily", "times": "09:00"}, "timezone": "UTC"},
        "cadence.simple.times",
    ),
    (
        "time-one-digit-hour",
        {"simple": {"frequency": "daily", "times": ["09:00", "9:00"]}, "timezone": "UTC"},
        "cadence.simple.times[1]",
    ),
    (
        "time-24",
        {"simple": {"frequency": "daily", "times": ["24:00"]}, "timezone": "UTC"},
        "cadence.simple.times[0]",
    ),
    (
        "time-minute-60",
        {"simple": {"frequency": "daily", "times": ["09:60"]}, "timezone": "UTC"},
        "cadence.simple.times[0]",
    ),
    (
        "time-with-seconds",
        {"simple": {"frequency": "daily", "times": ["09:00:00"]}, "timezone": "UTC"},
        "cadence.simple.times[0]",
    ),
    (
        "time-number",
        {"simple": {"frequency": "daily", "times": [900]}, "timezone": "UTC"},
        "cadence.simple.times[0]",
    ),
    (
        "weekly-missing-days",
        {"simple": {"frequency": "weekly", "times": ["09:00"]}, "timezone": "UTC"},
        "cadence.simple.days_of_week",
    ),
    (
        "weekly-empty-days",
        {
            "simple": {"frequency": "weekly", "times": ["09:00"], "days_of_week": []},
            "timezone": "UTC",
        },
        "cadence.simple.days_of_week",
    ),
    (
        "weekly-capital-day",
        {
            "simple": {"frequency": "weekly", "times": ["09:00"], "days_of_week": ["Mon"]},
            "timezone": "UTC",
        },
        "cadence.simple.days_of_week[0]",
    ),
    (
        "interval-zero",
        {"simple": {"frequency": "interval_hours", "interval_hours": 0}, "timezone": "UTC"},
        "cadence.simple.interval_hours",
    ),
    (
        "interval-25",
        {"simple": {"frequency": "interval_hours", "interval_hours": 25}, "timezone": "UTC"},
        "cadence.simple.interval_hours",
    ),
    (
        "interval-fraction",
        {"simple": {"frequency": "interval_hours", "interval_hours": 1.5}, "timezone": "UTC"},
        "cadence.simple.interval_hours",
    ),
    (
        "interval-string",
        {"simple": {"frequency": "interval_hours", "interval_hours": "4"}, "timezone": "UTC"},
        "cadence.simple.interval_hours",
    ),
    (
        "interval-bool",
        {"simple": {"frequency": "interval_hours", "interval_hours": True}, "timezone": "UTC"},
        "cadence.simple.interval_hours",
    ),
    (
        "interval-missing",
        {"simple": {"frequency": "interval_hours"}, "timezone": "UTC"},
        "cadence.simple.interval_hours",
    ),
]


@pytest.mark.parametrize(
    ("cadence", "field"),
    [(c, f) for _, c, f in CADENCE_CASES],
    ids=[i for i, _, _ in CADENCE_CASES],
)
def test_invalid_simple_cadence(cadence: Any, field: str) -> None:
    """Bad shapes, frequencies, fields and times are INVALID_CADENCE naming the field."""
    error = _error(cadence)
    assert isinstance(error, InvalidCadenceError)
    assert (error.code, error.field) == ("INVALID_CADENCE", field)
    assert field in error.message


BAD_CRON = {
    "last-day-L": "0 9 L * *",
    "weekday-W": "0 9 15W * *",
    "nth-weekday-hash": "0 9 * * 1#2",
    "question-mark": "0 9 ? * MON",
    "at-daily": "@daily",
    "six-fields-seconds": "0 0 9 * * *",
    "seven-fields": "0 0 9 * * * 2026",
    "four-fields": "0 9 * *",
    "reversed-range": "0 9 * * 5-1",
    "minute-60": "60 9 * * *",
    "hour-24": "0 24 * * *",
    "dom-0": "0 9 0 * *",
    "month-13": "0 9 1 13 *",
    "dow-8": "0 9 * * 8",
    "never-fires-feb-30": "0 9 30 2 *",
    "never-fires-apr-31": "0 9 31 4,6 *",
    "step-zero": "*/0 * * * *",
    "name-in-minute-field": "MON 9 * * *",
    "unknown-name": "0 9 * * FUN",
    "empty-list-item": "0,,30 9 * * *",
    "empty": "",
    "jenkins-H": "H 9 * * *",
}


@pytest.mark.parametrize("expression", BAD_CRON.values(), ids=BAD_CRON.keys())
def test_invalid_cron(expression: str) -> None:
    """Non-standard or never-firing cron is INVALID_CADENCE naming cadence.cron."""
    error = _error({"cron": expression, "timezone": "UTC"})
    assert isinstance(error, InvalidCadenceError)
    assert (error.code, error.field) == ("INVALID_CADENCE", "cadence.cron")
    assert "cadence.cron" in error.message


def test_cron_must_be_a_string() -> None:
    """A non-string cron is INVALID_CADENCE, not a TypeError."""
    error = _error({"cron": 5, "timezone": "UTC"})
    assert (error.code, error.field) == ("INVALID_CADENCE", "cadence.cron")


WINDOW_CASES = [
    ("not-object", ["08:00", "22:00"], "active_window"),
    ("unknown-key", {"from": "08:00"}, "active_window.from"),
    ("empty-days", {"days_of_week": []}, "active_window.days_of_week"),
    ("bad-day", {"days_of_week": ["mon", "monday"]}, "active_window.days_of_week[1]"),
    ("days-not-list", {"days_of_week": "mon"}, "active_window.days_of_week"),
    ("start-equals-end", {"hours": {"start": "08:00", "end": "08:00"}}, "active_window.hours.end"),
    ("bad-start", {"hours": {"start": "8am", "end": "22:00"}}, "active_window.hours.start"),
    ("end-24", {"hours": {"start": "08:00", "end": "24:00"}}, "active_window.hours.end"),
    ("missing-end", {"hours": {"start": "08:00"}}, "active_window.hours.end"),
    ("hours-not-object", {"hours": "08:00-22:00"}, "active_window.hours"),
    (
        "hours-unknown-key",
        {"hours": {"start": "08:00", "end": "22:00", "tz": "UTC"}},
        "active_window.hours.tz",
    ),
]


@pytest.mark.parametrize(
    ("window", "field"), [(w, f) for _, w, f in WINDOW_CASES], ids=[i for i, _, _ in WINDOW_CASES]
)
def test_invalid_active_window(window: Any, field: str) -> None:
    """Bad windows are INVALID_ACTIVE_WINDOW naming the field; an explicit [] never fires."""
    error = _error({"simple": DAILY, "timezone": "UTC"}, window)
    assert isinstance(error, InvalidActiveWindowError)
    assert (error.code, error.field) == ("INVALID_ACTIVE_WINDOW", field)
    assert field in error.message


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        (
            {"starts_at": utc("2026-05-02T00:00"), "ends_at": utc("2026-05-02T00:00")},
            "after starts_at",
        ),
        (
            {"starts_at": utc("2026-05-02T00:00"), "ends_at": utc("2026-05-01T00:00")},
            "after starts_at",
        ),
        ({"ends_at": utc("2026-05-01T00:00"), "now": utc("2026-05-01T00:00")}, "past"),
        ({"ends_at": utc("2026-04-01T00:00"), "now": utc("2026-05-01T00:00")}, "past"),
    ],
    ids=["ends-equals-starts", "ends-before-starts", "ends-equals-now", "ends-in-past"],
)
def test_invalid_window_bounds(bounds: dict[str, Any], message: str) -> None:
    """ends_at <= starts_at, or ends_at already past, is INVALID_WINDOW on ends_at."""
    error = _error({"simple": DAILY, "timezone": "UTC"}, **bounds)
    assert isinstance(error, InvalidWindowError)
    assert (error.code, error.field) == ("INVALID_WINDOW", "ends_at")
    assert message in error.message


def test_future_ends_at_is_fine() -> None:
    """ends_at after both starts_at and now compiles."""
    schedule = compile_schedule(
        {"simple": DAILY, "timezone": "UTC"},
        starts_at=utc("2026-05-01T00:00"),
        ends_at=utc("2026-05-01T00:01"),
        created_at=CREATED,
        now=utc("2026-05-01T00:00:30"),
    )
    assert schedule.ends_at == utc("2026-05-01T00:01")


@pytest.mark.parametrize(
    ("simple", "field"),
    [
        ({"frequency": "daily", "times": ["09:00", "12:00", "09:00"]}, "cadence.simple.times[2]"),
        (
            {"frequency": "weekly", "times": ["09:00"], "days_of_week": ["mon", "mon"]},
            "cadence.simple.days_of_week",
        ),
    ],
    ids=["repeated-time", "repeated-day"],
)
def test_too_frequent(simple: dict[str, Any], field: str) -> None:
    """Two fires in the same minute are CADENCE_TOO_FREQUENT."""
    error = _error({"simple": simple, "timezone": "UTC"})
    assert isinstance(error, CadenceTooFrequentError)
    assert (error.code, error.field) == ("CADENCE_TOO_FREQUENT", field)


def _times(count: int) -> list[str]:
    return [f"{m // 60:02d}:{m % 60:02d}" for m in range(0, count * 15, 15)][:count]


@pytest.mark.parametrize(
    ("cadence", "dense"),
    [
        ({"cron": "*/15 * * * *", "timezone": "America/New_York"}, False),
        ({"cron": "*/14 * * * *", "timezone": "America/New_York"}, True),
        ({"cron": "* * * * *", "timezone": "UTC"}, True),
        ({"cron": "* 9 * * *", "timezone": "UTC"}, False),
        ({"cron": "*/5 0-8 * * *", "timezone": "UTC"}, True),
        (
            {"simple": {"frequency": "daily", "times": _times(96)}, "timezone": "Europe/London"},
            False,
        ),
        (
            {"simple": {"frequency": "daily", "times": [*_times(96), "23:59"]}, "timezone": "UTC"},
            True,
        ),
        (
            {
                "simple": {
                    "frequency": "weekly",
                    "times": [*_times(96), "23:59"],
                    "days_of_week": ["mon"],
                },
                "timezone": "UTC",
            },
            True,
        ),
        (
            {"simple": {"frequency": "interval_hours", "interval_hours": 1}, "timezone": "UTC"},
            False,
        ),
    ],
    ids=[
        "cron-96-passes-even-in-dst-zone",
        "cron-every-14-min-fails",
        "cron-every-minute-fails",
        "cron-60-passes",
        "cron-108-fails",
        "daily-96-times-passes",
        "daily-97-times-fails",
        "weekly-97-times-fails",
        "interval-1h-never-dense",
    ],
)
def test_density_limit(cadence: dict[str, Any], dense: bool) -> None:
    """More than 96 raw ticks per day is CADENCE_TOO_DENSE; exactly 96 passes."""
    if dense:
        error = _error(cadence)
        assert isinstance(error, CadenceTooDenseError)
        field = "cadence.cron" if "cron" in cadence else "cadence.simple.times"
        assert (error.code, error.field) == ("CADENCE_TOO_DENSE", field)
    else:
        compile_schedule(cadence, created_at=CREATED)


@pytest.mark.parametrize(
    "value",
    [
        "2026-05-01T00:00:00",
        "2026-05-01",
        "yesterday",
        "2026-02-30T00:00:00Z",
        "2026-05-01T25:00:00Z",
        1714521600,
        None,
    ],
    ids=["naive", "date-only", "garbage", "feb-30", "hour-25", "number", "null"],
)
def test_parse_instant_rejects_naive_and_garbage(value: Any) -> None:
    """Only RFC 3339 with an offset parses; anything else is INVALID_REQUEST naming the field."""
    with pytest.raises(InvalidRequestError) as info:
        parse_instant(value, "starts_at")
    assert (info.value.code, info.value.field) == ("INVALID_REQUEST", "starts_at")
    assert "starts_at" in info.value.message


def test_parse_instant_offsets() -> None:
    """Offsets are applied: +hh:mm and -hh:mm land on the same UTC instant."""
    assert parse_instant("2026-05-01T08:00:00+08:00", "x") == utc("2026-05-01T00:00")
    assert parse_instant("2026-04-30T20:30:00-03:30", "x") == utc("2026-05-01T00:00")
    assert parse_instant("2026-05-01 00:00:00Z", "x") - utc("2026-05-01T00:00") == timedelta(0)


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "1969-12-31T23:59:59.999999Z",
        "1970-01-01T00:30:00+01:00",
        "2200-01-01T00:00:00Z",
        "2199-12-31T23:00:00-01:00",
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-23:59",
    ],
)
def test_parse_instant_refuses_instants_outside_the_sane_range(value: str) -> None:
    """Before 1970-01-01T00:00Z or from 2200-01-01T00:00Z on is INVALID_REQUEST naming the field."""
    with pytest.raises(InvalidRequestError) as info:
        parse_instant(value, "scheduled_at")
    assert (info.value.code, info.value.field) == ("INVALID_REQUEST", "scheduled_at")
    assert info.value.message.startswith("scheduled_at must be from 1970-01-01T00:00:00Z")


def test_parse_instant_range_bounds() -> None:
    """The range is 1970-01-01T00:00Z inclusive to 2200-01-01T00:00Z exclusive, offsets applied."""
    assert parse_instant("1970-01-01T00:00:00Z", "x") == utc("1970-01-01T00:00")
    assert parse_instant("1970-01-01T01:00:00+01:00", "x") == utc("1970-01-01T00:00")
    last = parse_instant("2199-12-31T23:59:59.999999Z", "x")
    assert last == utc("2200-01-01T00:00") - timedelta(microseconds=1)
    for outside in ("1969-12-31T23:59:59.999999Z", "2200-01-01T00:00:00Z"):
        with pytest.raises(InvalidRequestError):
            parse_instant(outside, "x")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from(["daily", "weekly", "interval_hours", "09:00", "UTC", "mon", "0 9 * * *"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "simple",
                    "cron",
                    "timezone",
                    "frequency",
                    "times",
                    "days_of_week",
                    "interval_hours",
                    "hours",
                    "start",
                    "end",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(json_values, json_values)
def test_any_json_input_gives_a_clean_error_or_a_schedule(cadence: Any, window: Any) -> None:
    """Arbitrary JSON never raises anything but a BadRequestError."""
    error: BadRequestError | None = None
    try:
        compile_schedule(cadence, window, created_at=CREATED)
    except BadRequestError as exc:
        error = exc
    if error is not None:
        assert error.code != "BAD_REQUEST"
        assert error.message


def test_overlong_cron_is_refused_without_echoing_it() -> None:
    """A huge cron string is INVALID_CADENCE with a short message."""
    error = _error({"cron": "0 " * 10_000, "timezone": "UTC"})
    assert (error.code, error.field) == ("INVALID_CADENCE", "cadence.cron")
    assert len(error.message) < 200


@pytest.mark.parametrize(
    ("short", "spelled_out"),
    [
        ("5/15 * * * *", "5-59/15 * * * *"),
        ("0 3/6 * * *", "0 3-23/6 * * *"),
        ("0 9 10/7 * *", "0 9 10-31/7 * *"),
        ("0 9 1 2/3 *", "0 9 1 2-12/3 *"),
        ("0 9 * * 1/2", "0 9 * * 1-6/2"),
        ("0 9 * * MON/2", "0 9 * * 1-6/2"),
    ],
)
def test_a_step_on_a_start_runs_to_the_end_of_the_field(short: str, spelled_out: str) -> None:
    """``a/n`` is ``a-<last>/n`` (day-of-week's last is Saturday), as croniter reads it."""
    mine = parse_cron(short)
    same = parse_cron(spelled_out)
    fields = (mine.minutes, mine.hours, mine.doms, mine.months, mine.dows)
    assert fields == (same.minutes, same.hours, same.doms, same.months, same.dows)
    # croniter writes a whole field as ["*"].
    expanded = croniter(short).expanded
    for values, theirs in zip(fields, expanded, strict=True):
        if theirs != ["*"]:
            assert sorted(values) == theirs


def test_a_compiled_shape_answers_only_its_own_values() -> None:
    """
    ``compile_schedule`` reuses what it made of a cadence and window before; that
    never answers other values equal in Python (``true == 1``, ``4.0 == 4``), a
    refused body is refused every time, and no two schedules share an object.
    """
    hours = {"frequency": "interval_hours", "interval_hours": 1}
    first = compile_schedule({"simple": hours, "timezone": "UTC"}, created_at=CREATED)
    assert first.cadence["simple"]["interval_hours"] == 1
    for _ in range(2):
        error = _error({"simple": {**hours, "interval_hours": True}, "timezone": "UTC"})
        assert error.field == "cadence.simple.interval_hours"
    whole = {"simple": {**hours, "interval_hours": 4.0}, "timezone": "UTC"}
    four = compile_schedule(whole, created_at=CREATED)
    assert four.cadence["simple"]["interval_hours"] == 4
    assert type(four.cadence["simple"]["interval_hours"]) is int
    # A time given as a number is refused however often, after the string compiled.
    compile_schedule({"simple": DAILY, "timezone": "UTC"}, created_at=CREATED)
    for _ in range(2):
        _error({"simple": {**DAILY, "times": [900]}, "timezone": "UTC"})

    window = {"hours": {"start": "08:00", "end": "20:00"}}
    one = compile_schedule({"simple": DAILY, "timezone": "UTC"}, window, created_at=CREATED)
    one.cadence["simple"]["times"].append("10:00")
    assert one.active_window is not None
    one.active_window["hours"]["end"] = "09:00"
    two = compile_schedule({"simple": DAILY, "timezone": "UTC"}, window, created_at=CREATED)
    assert two.cadence == {"simple": DAILY, "timezone": "UTC"}
    assert two.active_window == window
    # Bounds and anchor are the schedule's own, not the first compile's.
    later = compile_schedule(
        {"simple": DAILY, "timezone": "UTC"},
        window,
        created_at=CREATED + timedelta(hours=1, seconds=30),
        ends_at=CREATED + timedelta(days=3),
    )
    assert later.anchor == CREATED + timedelta(hours=1, minutes=1)
    assert later.ends_at == CREATED + timedelta(days=3)
    assert two.ends_at is None
