"""
The retention pass: prune expired history in batches, off the hot path, measured.

A thin shell over :class:`delivery.store.retention.RetentionStore`: it computes the
cutoffs from the clock and the settings, deletes one batch per table per pass, and
logs what went (rows per table, seconds). The daemon runs :meth:`Retention.step`
on a :class:`delivery.loops.PeriodicLoop` (a full batch runs the next pass at once,
so a backlog drains in short transactions); ``delivery prune`` runs
:meth:`Retention.prune_all`. Why pruning cannot make a fire or a message happen
twice is written in :mod:`delivery.store.retention`.
"""

import time
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.cadence import format_utc
from delivery.clock import Clock
from delivery.settings import Settings
from delivery.store.retention import (
    PRUNED_TABLES,
    Cutoffs,
    RetentionStore,
    SqlRetentionStore,
    fire_cutoff,
)

log = structlog.get_logger(__name__)


@dataclass
class PruneReport:
    """Rows deleted per table, the seconds it took, and whether a batch was full."""

    rows: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRUNED_TABLES, 0))
    seconds: float = 0.0
    more: bool = False

    @property
    def total(self) -> int:
        return sum(self.rows.values())


class Retention:
    """
    Prunes what is older than ``days``.

    Args:
        engine: the store's engine (schema migrated); not disposed of here.
        clock: "now" for the cutoffs.
        days: the retention (``DELIVERY_RETENTION_DAYS``).
        batch: rows per table per transaction.
        max_lateness: the scheduler's; fires are kept at least that (plus margin) long.
        store: the store to use instead of :class:`SqlRetentionStore` on ``engine``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        clock: Clock,
        *,
        days: int,
        batch: int,
        max_lateness: timedelta,
        store: RetentionStore | None = None,
    ) -> None:
        self.store: RetentionStore = store or SqlRetentionStore(engine)
        self.clock = clock
        self.retention = timedelta(days=days)
        self.batch = batch
        self.max_lateness = max_lateness

    @classmethod
    def from_settings(cls, settings: Settings, engine: AsyncEngine, clock: Clock) -> "Retention":
        """The pass as the daemon and ``delivery prune`` configure it."""
        return cls(
            engine,
            clock,
            days=settings.retention_days,
            batch=settings.retention_batch,
            max_lateness=timedelta(seconds=settings.max_lateness_s),
        )

    def cutoffs(self) -> Cutoffs:
        now = self.clock.now()
        rows = now - self.retention
        return Cutoffs(rows=rows, fires=fire_cutoff(rows, now, self.max_lateness))

    async def pass_once(self) -> PruneReport:
        """One batch per table; ``more`` when any batch was full."""
        cutoffs = self.cutoffs()
        report = PruneReport()
        started = time.perf_counter()
        for table in PRUNED_TABLES:
            deleted = await self.store.prune_batch(table, cutoffs, self.batch)
            report.rows[table] = deleted
            report.more = report.more or deleted >= self.batch
        report.seconds = time.perf_counter() - started
        if report.total:
            log.info(
                "retention.pruned",
                rows=report.rows,
                seconds=round(report.seconds, 4),
                cutoff=format_utc(cutoffs.rows),
                fire_cutoff=format_utc(cutoffs.fires),
            )
        return report

    async def step(self) -> bool:
        """The daemon's loop step: one pass; True when a backlog remains."""
        return (await self.pass_once()).more

    async def prune_all(self) -> PruneReport:
        """Passes until nothing older is left; the totals, logged once at the end."""
        total = PruneReport()
        started = time.perf_counter()
        while True:
            report = await self.pass_once()
            for table, deleted in report.rows.items():
                total.rows[table] += deleted
            if not report.more:
                break
        total.seconds = time.perf_counter() - started
        log.info(
            "retention.done",
            rows=total.rows,
            total=total.total,
            seconds=round(total.seconds, 4),
            retention_days=self.retention.days,
        )
        return total
