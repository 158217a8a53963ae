"""The pure delivery-policy rules: budget shares, window openings across DST, deadlines."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from delivery.cadence import Window, compile_window
from delivery.policy import (
    DEFAULT_POLICY,
    Candidate,
    QuietHours,
    SourcePolicy,
    allot,
    allot_rolling,
    decide,
    project_policy,
    source_policy,
)

NY = ZoneInfo("America/New_York")
AT = datetime(2026, 5, 2, 12, tzinfo=UTC)


def test_allot_serves_higher_priorities_first_and_critical_always() -> None:
    """One unit left: high wins over normal and low; critical passes beyond the limit."""
    wanting = [
        Candidate("low", "low", AT),
        Candidate("normal", "normal", AT),
        Candidate("high", "high", AT + timedelta(seconds=1)),
        Candidate("crit", "critical", AT + timedelta(seconds=2)),
    ]
    passed, suppressed = allot(wanting, used=2, limit=3)
    assert passed == ["crit"]
    assert sorted(suppressed) == ["high", "low", "normal"]
    passed, suppressed = allot(wanting, used=1, limit=3)
    assert passed == ["crit", "high"]


def test_allot_rolling_decides_each_instant_in_the_window_ending_there() -> None:
    """
    Two a day, three a day asked for over three days, one spent the evening before:
    the first morning has one unit left; later mornings find the day before's
    passed messages gone from the window; a message held for later still counts.
    """
    day = timedelta(days=1)
    wanting = [
        Candidate(f"{d}-{h}", "high" if h == 11 else "normal", AT + d * day + timedelta(hours=h))
        for d in range(3)
        for h in (9, 10, 11)
    ]
    passed, suppressed = allot_rolling(wanting, [AT - timedelta(hours=2)], 2, day)
    assert passed == ["0-9", "1-9", "1-10", "2-9", "2-10"]
    assert suppressed == ["0-10", "0-11", "1-11", "2-11"]
    held = [AT + 3 * day]
    assert allot_rolling(wanting[:1], held, 1, day) == ([], ["0-9"])


def test_quiet_hours_open_at_their_end_and_wrap_midnight() -> None:
    """22:00-07:30 New York: 23:00 opens at 07:30 the next morning, local time."""
    quiet = QuietHours("America/New_York", 22 * 60, 7 * 60 + 30)
    late = datetime(2026, 6, 1, 23, 0, tzinfo=NY)
    assert quiet.contains(late)
    assert quiet.next_opening(late) == datetime(2026, 6, 2, 7, 30, tzinfo=NY)
    noon = datetime(2026, 6, 1, 12, 0, tzinfo=NY)
    assert not quiet.contains(noon)
    assert quiet.next_opening(noon) == noon


def test_an_opening_in_the_spring_forward_gap_is_right_after_the_jump() -> None:
    """Window from 02:30 on 2026-03-08 (New York jumps 02:00 -> 03:00): opens 03:00 EDT."""
    window = Window(NY, 2 * 60 + 30, 22 * 60)
    before = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)  # 01:00 EST
    assert window.next_inside(before) == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)


def test_an_opening_on_the_fall_back_day_is_its_first_occurrence() -> None:
    """01:30 happens twice on 2026-11-01 in New York: the window opens at the first."""
    window = Window(NY, 90, 22 * 60)
    before = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)  # 00:00 EDT
    assert window.next_inside(before) == datetime(2026, 11, 1, 5, 30, tzinfo=UTC)


def test_window_days_are_kept() -> None:
    """Weekdays only: a Saturday fire waits for Monday's opening."""
    window = compile_window(
        {"hours": {"start": "09:00", "end": "17:00"}, "days_of_week": ["mon", "fri"]}, "UTC"
    )
    assert window is not None
    saturday = datetime(2026, 6, 6, 10, tzinfo=UTC)
    assert window.next_inside(saturday) == datetime(2026, 6, 8, 9, tzinfo=UTC)


def test_deadline_is_the_earlier_of_ttl_and_expires_at() -> None:
    policy = SourcePolicy(ttl_seconds=3600, expires_at=AT + timedelta(minutes=30))
    assert policy.deadline(AT) == AT + timedelta(minutes=30)
    assert SourcePolicy(ttl_seconds=60).deadline(AT) == AT + timedelta(seconds=60)
    assert SourcePolicy().deadline(AT) is None


def test_stored_forms_round_trip_and_default_is_nothing() -> None:
    policy = SourcePolicy(
        priority="critical", outside_window="defer", ttl_seconds=5, supersede_key="k"
    )
    stored = policy.stored()
    assert stored is not None
    assert source_policy(stored) == policy
    assert SourcePolicy().stored() is None
    assert project_policy(None) == DEFAULT_POLICY
    assert project_policy("not json") == DEFAULT_POLICY


def test_decide_without_rules_keeps_the_message() -> None:
    outcome = decide(SourcePolicy(), DEFAULT_POLICY, None, due=AT, fire_at=AT, next_fire_at=None)
    assert (outcome.status, outcome.reason, outcome.due_at, outcome.expires_at) == (
        None,
        None,
        None,
        None,
    )
