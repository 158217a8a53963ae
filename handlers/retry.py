"""
PURE retry timing: when to try a failed delivery again, and when to give up.

No clock, no I/O: ``now`` and the randomness source are passed in. Channels only say
*whether* to retry (:mod:`handlers.classify`); this module says *when*.
"""

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

from handlers.base import Delivered, Failed, Outcome, Retry

SCHEDULE: tuple[timedelta, ...] = (
    timedelta(0),
    timedelta(seconds=5),
    timedelta(minutes=5),
    timedelta(minutes=30),
    timedelta(hours=2),
    timedelta(hours=5),
    timedelta(hours=10),
    timedelta(hours=10),
)
"""
Delay before attempt ``n`` is ``SCHEDULE[n - 1]``: immediately, then 5 s, 5 min, 30 min,
2 h, 5 h, 10 h, 10 h (after Svix's published schedule). Eight attempts spread
over about 27.6 hours, so a receiver that is down for a day still gets the message.
"""

MAX_ATTEMPTS = len(SCHEDULE)

JITTER = 0.2
"""Each delay is scaled by a factor in ``[1 - JITTER, 1 + JITTER)`` so that the retries
of a burst of failures do not hit a recovering receiver in lockstep."""

MAX_RETRY_AFTER = timedelta(hours=10)
"""A ``Retry-After`` beyond this is capped: a receiver cannot park a message for longer
than our longest step (and a hostile one cannot make us hold it forever)."""

type Rand = Callable[[], float]
"""A source of floats in ``[0, 1)``; ``random.random`` by default, fixed in tests."""


def jittered(delay: timedelta, rand: Rand) -> timedelta:
    """``delay`` scaled by a uniform factor in ``[1 - JITTER, 1 + JITTER)``."""
    return delay * (1 + JITTER * (2 * rand() - 1))


def next_delay(
    failed_attempt: int,
    *,
    retry_after: timedelta | None = None,
    rand: Rand = random.random,
) -> timedelta | None:
    """
    How long to wait after attempt ``failed_attempt`` (1-based) failed transiently.

    Args:
        failed_attempt: the number of the attempt that just failed.
        retry_after: the receiver's ``Retry-After`` (RFC 9110 10.2.3), if it sent one.
            It is a floor: the next attempt is never earlier than it asked, nor earlier
            than the schedule says; it is capped at :data:`MAX_RETRY_AFTER`.
        rand: jitter source.

    Returns:
        The delay, or ``None`` when ``failed_attempt`` was the last one: dead letter.

    Raises:
        ValueError: ``failed_attempt`` is below 1.
    """
    if failed_attempt < 1:
        raise ValueError(f"attempt numbers start at 1, got {failed_attempt}")
    if failed_attempt >= MAX_ATTEMPTS:
        return None
    delay = jittered(SCHEDULE[failed_attempt], rand)
    if retry_after is not None:
        floor = min(max(retry_after, timedelta(0)), MAX_RETRY_AFTER)
        delay = max(delay, floor)
    return delay


def parse_retry_after(value: str | None, *, now: datetime) -> timedelta | None:
    """
    Parse a ``Retry-After`` header: delay-seconds or an HTTP-date (RFC 9110 10.2.3).

    Returns:
        The delay from ``now`` (never negative), or ``None`` when absent or unparseable:
        a broken header must not break the retry, it is simply ignored.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # Cap before building a timedelta: "99999999999999" would overflow it.
        return timedelta(seconds=min(int(value), int(MAX_RETRY_AFTER.total_seconds())))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # RFC 9110 5.6.7: HTTP-dates are GMT
    return max(when - now, timedelta(0))


@dataclass(frozen=True, slots=True)
class Done:
    """Delivered: record the attempt and mark the message consumed."""


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Try again at ``at`` as attempt ``attempt_number``."""

    at: datetime
    attempt_number: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """
    Give up: the message stays visible as dead-lettered. When
    ``disable_destination`` is set (410 Gone) the endpoint is disabled as well.
    """

    reason: str
    disable_destination: bool = False


type NextStep = Done | RetryAt | DeadLetter


def plan_next(
    outcome: Outcome,
    attempt_number: int,
    *,
    now: datetime,
    rand: Rand = random.random,
) -> NextStep:
    """
    What the caller does after attempt ``attempt_number`` ended with ``outcome``.

    The durable retry queue applies the result; this function decides it, so
    the decision is pure and testable without a database.

    Returns:
        :class:`Done` for :class:`Delivered`; :class:`RetryAt` for a :class:`Retry` with
        attempts left; :class:`DeadLetter` for :class:`Failed` or the last attempt.
    """
    match outcome:
        case Delivered():
            return Done()
        case Failed(reason=reason, disable_destination=disable):
            return DeadLetter(reason, disable_destination=disable)
        case Retry(reason=reason, after=after):
            delay = next_delay(attempt_number, retry_after=after, rand=rand)
            if delay is None:
                return DeadLetter(f"gave up after {attempt_number} attempts; last: {reason}")
            return RetryAt(at=now + delay, attempt_number=attempt_number + 1)
