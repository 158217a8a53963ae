"""
The polling loop both handler workers run beside their JetStream consumer.

The webhook worker claims due deliveries and the channels worker claims due
retries the same way: run a step, go again at once while it reports a full batch
(a backlog drains back to back), otherwise sleep until the poll interval passes
or someone calls :meth:`PollLoop.wake` (new work was queued, a slot freed, or a
stop was requested). A failing step (the database is down) backs off
exponentially up to 30 s instead of logging every interval; the work it could
not claim stays in the database, so nothing is lost meanwhile.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from delivery.clock import backoff_s, sleep_or_wake


class PollLoop:
    """
    Runs ``step`` in a task until :meth:`stop`.

    Args:
        name: the task's name, and the loop's in log lines.
        step: one pass; returns True when it stopped at a batch bound (more may be
            due right now). Exceptions are logged and backed off, never raised.
        interval_s: the longest sleep between passes when nothing wakes the loop.
        log: the worker's structlog logger (``<name>.step_failed`` lines).
    """

    def __init__(
        self, name: str, step: Callable[[], Awaitable[bool]], interval_s: float, log: Any
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._step = step
        self._log = log
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
