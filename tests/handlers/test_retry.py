"""The retry schedule: Svix-like steps, jitter bounds, Retry-After, dead letter."""

from datetime import UTC, datetime, timedelta

import pytest

from handlers.base import Delivered, Failed, Retry
from handlers.retry import (
    JITTER,
    MAX_ATTEMPTS,
    MAX_RETRY_AFTER,
    SCHEDULE,
    DeadLetter,
    Done,
    RetryAt,
    next_delay,
    parse_retry_after,
    plan_next,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def mid() -> float:
    """A jitter draw of 0.5: no jitter at all."""
    return 0.5


def test_schedule_is_svix_like() -> None:
    """Eight attempts: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h."""
    assert [d.total_seconds() for d in SCHEDULE] == [
        0,
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
    ]
    assert MAX_ATTEMPTS == 8


@pytest.mark.parametrize(
    ("failed_attempt", "expected"),
    [(n, SCHEDULE[n]) for n in range(1, MAX_ATTEMPTS)],
    ids=[f"after-attempt-{n}" for n in range(1, MAX_ATTEMPTS)],
)
def test_delay_follows_schedule_without_jitter(failed_attempt: int, expected: timedelta) -> None:
    """With a neutral jitter draw the delay after attempt n is SCHEDULE[n]."""
    assert next_delay(failed_attempt, rand=mid) == expected


@pytest.mark.parametrize("draw", [0.0, 0.999999], ids=["lowest", "highest"])
def test_jitter_stays_within_bounds(draw: float) -> None:
    """Jitter scales every step by at most +-20%."""
    for n in range(1, MAX_ATTEMPTS):
        delay = next_delay(n, rand=lambda: draw)
        assert delay is not None
        assert SCHEDULE[n] * (1 - JITTER) <= delay <= SCHEDULE[n] * (1 + JITTER)


def test_after_last_attempt_is_dead_letter() -> None:
    """After the eighth attempt there is no next delay."""
    assert next_delay(MAX_ATTEMPTS, rand=mid) is None


def test_attempt_numbers_start_at_one() -> None:
    """Attempt 0 is a caller bug, not a schedule position."""
    with pytest.raises(ValueError, match="start at 1"):
        next_delay(0)


def test_retry_after_longer_than_step_is_honoured() -> None:
    """A Retry-After longer than the scheduled step becomes the delay."""
    assert next_delay(1, retry_after=timedelta(seconds=90), rand=mid) == timedelta(seconds=90)


def test_retry_after_shorter_than_step_keeps_schedule() -> None:
    """A Retry-After shorter than the step does not make us retry sooner."""
    assert next_delay(2, retry_after=timedelta(seconds=1), rand=mid) == SCHEDULE[2]


def test_retry_after_is_capped() -> None:
    """A Retry-After of a week is capped at MAX_RETRY_AFTER."""
    assert next_delay(1, retry_after=timedelta(days=7), rand=mid) == MAX_RETRY_AFTER


def test_retry_after_does_not_extend_attempts() -> None:
    """Retry-After after the last attempt still dead-letters."""
    assert next_delay(MAX_ATTEMPTS, retry_after=timedelta(seconds=1)) is None


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", timedelta(seconds=120)),
        (" 0 ", timedelta(0)),
        ("Sun, 01 Mar 2026 12:02:00 GMT", timedelta(minutes=2)),
        ("Sun, 01 Mar 2026 11:00:00 GMT", timedelta(0)),
        ("99999999999999999999", MAX_RETRY_AFTER),
        ("soon", None),
        ("-5", None),
        (None, None),
    ],
    ids=["seconds", "zero", "http-date", "past-date", "huge", "garbage", "negative", "absent"],
)
def test_parse_retry_after(header: str | None, expected: timedelta | None) -> None:
    """Retry-After is delay-seconds or an HTTP-date (RFC 9110 10.2.3); junk is ignored."""
    assert parse_retry_after(header, now=NOW) == expected


def test_plan_delivered_is_done() -> None:
    """A 2xx ends the delivery."""
    assert plan_next(Delivered(200), 3, now=NOW) == Done()


def test_plan_retry_schedules_next_attempt() -> None:
    """A transient failure schedules attempt n+1 at now + the step."""
    assert plan_next(Retry("HTTP 500", 500), 2, now=NOW, rand=mid) == RetryAt(
        at=NOW + timedelta(minutes=5), attempt_number=3
    )


def test_plan_retry_honours_retry_after() -> None:
    """The Retry-After carried on the outcome is applied."""
    step = plan_next(Retry("HTTP 429", 429, after=timedelta(minutes=1)), 1, now=NOW, rand=mid)
    assert step == RetryAt(at=NOW + timedelta(minutes=1), attempt_number=2)


def test_plan_last_failure_dead_letters() -> None:
    """The eighth transient failure dead-letters with the last reason."""
    step = plan_next(Retry("HTTP 503", 503), MAX_ATTEMPTS, now=NOW)
    assert isinstance(step, DeadLetter)
    assert "HTTP 503" in step.reason
    assert not step.disable_destination


def test_plan_gone_dead_letters_and_disables() -> None:
    """410 Gone dead-letters at once and disables the endpoint."""
    step = plan_next(Failed("gone", 410, disable_destination=True), 1, now=NOW)
    assert step == DeadLetter("gone", disable_destination=True)
