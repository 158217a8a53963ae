"""
The handlers process: every handler worker, started and stopped together.

``delivery handlers`` and ``delivery run`` build it through :func:`build_handlers`
(the daemon's start / stop protocol) or run it with :func:`run_handlers`. A new
worker is one more entry in :data:`WORKERS`.
"""

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.clock import Clock
from delivery.settings import Settings
from handlers.channels_worker import build_channels_worker
from handlers.webhooks.worker import WebhookWorker

log = structlog.get_logger(__name__)


class Worker(Protocol):
    """A long-running handler part."""

    async def start(self) -> None:
        """Begin work; return once running."""
        ...

    async def stop(self) -> None:
        """Finish or hand back in-flight work and release resources."""
        ...


type WorkerFactory = Callable[[Settings, AsyncEngine, str | None, Clock], Worker]


def _webhooks(
    settings: Settings, engine: AsyncEngine, nats_url: str | None, clock: Clock
) -> Worker:
    return WebhookWorker.from_settings(settings, engine, nats_url=nats_url, clock=clock)


WORKERS: tuple[WorkerFactory, ...] = (_webhooks, build_channels_worker)
"""Every handler worker the process runs, in start order (stopped in reverse)."""


class HandlersRunner:
    """
    Starts :data:`WORKERS` in order and stops them in reverse.

    If a worker fails to start, the ones already started are stopped before the
    error propagates, so a failed start leaks nothing.
    """

    def __init__(self, workers: Sequence[Worker]) -> None:
        self.workers = list(workers)
        self._started: list[Worker] = []

    async def start(self) -> None:
        """Start every worker; on failure stop those started, then re-raise."""
        try:
            for worker in self.workers:
                await worker.start()
                self._started.append(worker)
        except BaseException:
            await self.stop()
            raise
        log.info("handlers.started", workers=[type(w).__name__ for w in self._started])

    async def stop(self) -> None:
        """Stop the started workers in reverse order; one failing does not stop the rest."""
        while self._started:
            worker = self._started.pop()
            try:
                await worker.stop()
            except Exception:
                log.exception("handlers.stop_failed", worker=type(worker).__name__)


def build_handlers(
    settings: Settings, engine: AsyncEngine, *, nats_url: str | None, clock: Clock
) -> HandlersRunner:
    """The handlers part for the daemon: ``await runner.start()`` ... ``await runner.stop()``."""
    return HandlersRunner([factory(settings, engine, nats_url, clock) for factory in WORKERS])


async def run_handlers(
    settings: Settings,
    engine: AsyncEngine,
    nats_url: str,
    clock: Clock,
    stop: asyncio.Event,
) -> None:
    """Run every handler worker until ``stop`` is set, then stop them cleanly."""
    runner = build_handlers(settings, engine, nats_url=nats_url, clock=clock)
    await runner.start()
    try:
        await stop.wait()
    finally:
        await runner.stop()
