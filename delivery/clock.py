"""One clock abstraction, so time is injectable: nothing else calls ``datetime.now()``."""

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Where "now" comes from. Always returns an aware UTC datetime."""

    def now(self) -> datetime:
        """The current instant, aware, in UTC."""
        ...


class SystemClock:
    """The host's wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """
    A clock that only moves when told to: tests and advance-time use it.

    ``advance`` and ``set`` wake anything waiting in :meth:`changed`, so a
    scheduler loop driven by this clock reacts without sleeping.
    """

    def __init__(self, start: datetime) -> None:
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start.astimezone(UTC)
        self._changed: asyncio.Event | None = None

    def now(self) -> datetime:
        return self._now

    def set(self, instant: datetime) -> None:
        """Jump to ``instant`` (aware); moving backwards is allowed for tests."""
        if instant.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = instant.astimezone(UTC)
        self._notify()

    def advance(self, delta: timedelta) -> datetime:
        """Move forward by ``delta`` and return the new now."""
        self._now += delta
        self._notify()
        return self._now

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def changed(self) -> None:
        """Wait until the clock is moved next."""
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()


MAX_BACKOFF_S = 30.0
"""The longest pause of a polling loop after consecutive failing passes."""


def backoff_s(failures: int) -> float:
    """
    The pause after ``failures`` consecutive failing passes of a loop: 1, 2, 4 ... 30 s.

    A loop whose database is down backs off instead of logging every interval;
    the work it could not claim stays in the database meanwhile.
    """
    return min(MAX_BACKOFF_S, 0.5 * 2.0**failures)


async def sleep_or_wake(wakeup: asyncio.Event, seconds: float) -> None:
    """
    Sleep up to ``seconds``, returning early once ``wakeup`` is set.

    Polling loops use it so new work (or a stop request) is picked up at once
    instead of at the next poll.
    """
    try:
        await asyncio.wait_for(wakeup.wait(), timeout=seconds)
    except TimeoutError:
        return
