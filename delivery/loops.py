"""
The one periodic loop every process runs its polling work on: the scheduler tick,
the outbox relay and its prune, the advance-time job sweep, and the handler
workers' claims of due deliveries and retries.

Run a step, go again at once while it reports a full batch (a backlog drains back
to back), otherwise sleep until the interval passes or someone calls
:meth:`PeriodicLoop.wake` (a write made work due sooner, a slot freed, a stop was
requested). A wake during a pass adds exactly one more pass, never a concurrent
one. A failing step (the database is down) backs off exponentially up to 30 s
instead of logging every interval; the work it could not claim stays in the
database, so nothing is lost meanwhile.

It is a task over an :class:`asyncio.Event` rather than an APScheduler interval
job: waking an APScheduler job meant rescheduling it and guarding against
overlapping runs by hand, a second scheduler for the same behaviour.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from delivery.clock import backoff_s, sleep_or_wake

_log = structlog.get_logger(__name__)


class PeriodicLoop:
    """
    Runs ``step`` in a task until :meth:`stop`.

    Args:
        name: the task's name, and the loop's in log lines.
        step: one pass; returns True when it stopped at a batch bound (more may be
            due right now). Exceptions are logged and backed off, never raised.
        interval_s: the longest sleep between passes when nothing wakes the loop.
        log: the owner's structlog logger for ``poll.step_failed`` lines
            (this module's by default).
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], Awaitable[bool]],
        interval_s: float,
        log: Any | None = None,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._step = step
        self._log = log if log is not None else _log
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the loop; the first pass runs at once."""
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Run the next pass now instead of after the interval (cheap, idempotent)."""
        self._wakeup.set()

    async def stop(self) -> None:
        """Let the current pass finish, then end the loop."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wakeup.clear()
            try:
                more = await self._step()
                failures = 0
            except Exception:
                failures += 1
                delay = backoff_s(failures)
                self._log.exception(
                    "poll.step_failed", loop=self.name, failures=failures, retry_in_s=delay
                )
                await sleep_or_wake(self._wakeup, delay)
                continue
            if not more:
                await sleep_or_wake(self._wakeup, self.interval_s)
