"""The scrape-time work gauges count an advanced pair's rows by their real instant."""

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.gauges import GaugeStore
from delivery.store.tables import PROJECTS, SCHEDULES
from tests.store.test_direct import T, schedule


async def test_schedules_due_counts_advanced_pairs_by_their_real_instant(
    engine: AsyncEngine,
) -> None:
    soon, later = T + timedelta(seconds=30), T + timedelta(hours=3)
    async with engine.begin() as conn:
        await conn.execute(PROJECTS.insert().values(id="prj", name="p", created_at=T))
        await conn.execute(
            SCHEDULES.insert(),
            [
                # Real time: due in 30 s, and due in 3 h.
                schedule(1, next_fire_at=soon, due_at=None),
                schedule(2, next_fire_at=later, due_at=None),
                # A pair 48 h ahead: its next fire is 48 h away on real time's clock
                # face but due (in real time) in 30 s; and the reverse case.
                schedule(3, next_fire_at=soon + timedelta(hours=48), due_at=soon),
                schedule(5, next_fire_at=soon + timedelta(hours=48), due_at=soon),
                schedule(4, next_fire_at=soon, due_at=later),
            ],
        )
    gauges = await GaugeStore(engine).work(T)
    assert gauges.schedules_due == 3  # 1, 3 and 5
