"""
The queries behind the operators' gauges and readiness: is the database there, is
its schema at the shipped head, and how much work is waiting (outbox backlog and its
oldest row, schedules and wakeups due within a minute, notifications by status).

Read at scrape time by :mod:`delivery.ops`; each query is one indexed count except
the notifications by status, which reads the table (hence the refresh floor there).
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select, text

from delivery.store.engine import Engine
from delivery.store.migrate import shipped_head, stored_revision
from delivery.store.tables import NOTIFICATIONS, OUTBOX, SCHEDULES, WAKEUPS

DUE_WITHIN = timedelta(minutes=1)
"""What "due soon" means for the schedules and wakeups gauges."""


@dataclass(frozen=True, slots=True)
class WorkGauges:
    """
    Work waiting in the database at one instant.

    Attributes:
        outbox_backlog: unsent outbox rows already publishable.
        outbox_oldest_age_s: age of the oldest of those (since it became publishable), 0 if none.
        schedules_due: enabled schedules whose next fire is within :data:`DUE_WITHIN`
            (overdue ones included).
        wakeups_due: pending wakeups due within :data:`DUE_WITHIN`.
        notifications: notification rows by status.
    """

    outbox_backlog: int = 0
    outbox_oldest_age_s: float = 0.0
    schedules_due: int = 0
    wakeups_due: int = 0
    notifications: dict[str, int] = field(default_factory=dict)


class GaugeStore:
    """The operators' queries over one engine (both databases)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def ping(self) -> None:
        """A trivial query; raises whatever the driver raises when the database is down."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def schema_at_head(self) -> tuple[bool, str | None]:
        """Whether the schema is at the shipped migration head, and the revision it is at."""
        stored = await stored_revision(self.engine)
        return stored == shipped_head(), stored

    async def work(self, now: datetime) -> WorkGauges:
        """The waiting work at ``now``."""
        o, s, w, n = OUTBOX.c, SCHEDULES.c, WAKEUPS.c, NOTIFICATIONS.c
        due_by = now + DUE_WITHIN
        async with self.engine.connect() as conn:
            backlog, oldest = (
                await conn.execute(
                    select(func.count(), func.min(o.available_at)).where(
                        o.sent_at.is_(None), o.available_at <= now
                    )
                )
            ).one()
            # An advanced pair's rows are due by their real instant (``due_at``), the
            # others by their own; two counts, each on the index its claim uses.
            schedules = 0
            for when in (
                (s.due_at.is_(None), s.next_fire_at <= due_by),
                (s.due_at <= due_by,),
            ):
                schedules += (
                    await conn.execute(select(func.count()).where(s.enabled.is_(True), *when))
                ).scalar_one()
            wakeups = 0
            for when in (
                (w.due_at.is_(None), w.scheduled_at <= due_by),
                (w.due_at <= due_by,),
            ):
                wakeups += (
                    await conn.execute(select(func.count()).where(w.status == "pending", *when))
                ).scalar_one()
            statuses = (await conn.execute(select(n.status, func.count()).group_by(n.status))).all()
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        return WorkGauges(
            outbox_backlog=int(backlog),
            outbox_oldest_age_s=max(0.0, age),
            schedules_due=int(schedules),
            wakeups_due=int(wakeups),
            notifications={str(status): int(count) for status, count in statuses},
        )
