"""
Property tests: the compiled engine agrees with the slow reference on random schedules.

Each shrunk failure becomes a permanent ``@example``.
"""

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from delivery.cadence import (
    CompiledSchedule,
    Tick,
    compile_schedule,
    next_fire,
    ticks_between,
    upcoming,
)
from delivery.errors import BadRequestError
from tests.cadence.reference import RefSchedule, RefTick, reference_ticks
from tests.cadence.strategies import scenarios


def _compile(case: dict[str, Any]) -> CompiledSchedule:
    try:
        return compile_schedule(
            case["cadence"],
            case["active_window"],
            starts_at=case["starts_at"],
            ends_at=case["ends_at"],
            created_at=case["created_at"],
        )
    except BadRequestError:
        # Too dense, or a cron that can never fire: not a schedule to compare.
        assume(False)
        raise


def _reference(case: dict[str, Any]) -> list[RefTick]:
    ref = RefSchedule(
        cadence=case["cadence"],
        window=case["active_window"],
        starts_at=case["starts_at"],
        ends_at=case["ends_at"],
        created_at=case["created_at"],
    )
    return reference_ticks(ref, case["after"], case["until"])


def _as_rows(ticks: Sequence[Tick | RefTick]) -> list[tuple[str, str, str | None]]:
    return [
        (t.fire_at.astimezone(UTC).isoformat(), t.local.isoformat(), t.skipped and str(t.skipped))
        for t in ticks
    ]


def _case(
    cadence: dict[str, Any], window: dict[str, Any] | None, after: datetime, until: datetime
) -> dict[str, Any]:
    return {
        "cadence": cadence,
        "active_window": window,
        "starts_at": None,
        "ends_at": None,
        "created_at": after,
        "after": after,
        "until": until,
    }


_NY_GAP = _case(
    {"simple": {"frequency": "daily", "times": ["02:30", "03:00"]}, "timezone": "America/New_York"},
    None,
    datetime(2026, 3, 8, 6, 0, tzinfo=UTC),
    datetime(2026, 3, 9, 6, 0, tzinfo=UTC),
)
_LONDON_FOLD = _case(
    {"cron": "*/15 1 * * *", "timezone": "Europe/London"},
    {"hours": {"start": "01:15", "end": "01:45"}},
    datetime(2026, 10, 25, 0, 20, tzinfo=UTC),
    datetime(2026, 10, 25, 3, 0, tzinfo=UTC),
)
_APIA = _case(
    {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "Pacific/Apia"},
    None,
    datetime(2011, 12, 28, tzinfo=UTC),
    datetime(2012, 1, 1, tzinfo=UTC),
)


@given(scenarios())
@example(_NY_GAP)
@example(_LONDON_FOLD)
@example(_APIA)
def test_ticks_between_matches_reference(case: dict[str, Any]) -> None:
    """Every raw tick in (after, until], skipped or not, equals the reference's."""
    schedule = _compile(case)
    expected = _reference(case)
    assert _as_rows(ticks_between(schedule, case["after"], case["until"])) == _as_rows(expected)


@given(scenarios())
@example(_NY_GAP)
@example(_LONDON_FOLD)
@example(_APIA)
def test_next_fire_and_upcoming_match_reference(case: dict[str, Any]) -> None:
    """next_fire and upcoming return the reference's unskipped ticks, in order, none twice."""
    schedule = _compile(case)
    after, until = case["after"], case["until"]
    fires = [t.fire_at for t in _reference(case) if t.skipped is None]
    first = next_fire(schedule, after)
    if fires:
        assert first == fires[0]
    else:
        assert first is None or first > until
    preview = upcoming(schedule, after, 5)
    assert [f for f in preview if f <= until] == fires[:5]
    assert preview == sorted(set(preview))


@given(scenarios(), st.integers(1, 4 * 1440))
def test_ticks_partition_the_timeline(case: dict[str, Any], split_minutes: int) -> None:
    """ticks_between over (a, b] and (b, c] together equal (a, c]: none lost or repeated."""
    schedule = _compile(case)
    after, until = case["after"], case["until"]
    middle = min(after + timedelta(minutes=split_minutes), until)
    whole = ticks_between(schedule, after, until)
    assert ticks_between(schedule, after, middle) + ticks_between(schedule, middle, until) == whole


@pytest.mark.parametrize(
    "case", [_NY_GAP, _LONDON_FOLD, _APIA], ids=["ny-gap", "london-fold", "apia"]
)
def test_reference_sees_named_transitions(case: dict[str, Any]) -> None:
    """The reference itself reports the gap and fold cases the way the invariant says."""
    rows = _as_rows(_reference(case))
    assert rows == _as_rows(ticks_between(_compile(case), case["after"], case["until"]))


_ZONES = ["UTC", "America/New_York", "Europe/London", "Asia/Kolkata", "Pacific/Apia"]


@given(
    st.sampled_from(_ZONES),
    st.integers(1, 24),
    st.datetimes(
        min_value=datetime(2020, 1, 1),  # noqa: DTZ001 - hypothesis wants naive bounds
        max_value=datetime(2030, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    st.integers(1, 3 * 365 * 24 * 3600),
)
def test_an_interval_never_fires_before_its_anchor(
    zone: str, hours: int, created_at: datetime, earlier_s: int
) -> None:
    """
    An interval_hours schedule anchored at its creation: asked from any earlier
    instant, its first fire is the anchor itself, and no tick lies before it.
    """
    schedule = compile_schedule(
        {"simple": {"frequency": "interval_hours", "interval_hours": hours}, "timezone": zone},
        created_at=created_at,
    )
    asked = created_at - timedelta(seconds=earlier_s)
    assert next_fire(schedule, asked) == schedule.anchor
    assert schedule.anchor >= created_at
    assert all(t.fire_at >= schedule.anchor for t in ticks_between(schedule, asked, created_at))
