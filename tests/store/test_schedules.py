"""
The scheduler's store keeps its contract on both databases, in both of its forms
(SQLite's driver-thread writes and the portable Core statements): a plan commits
whole or not at all, a fire is never inserted twice, and a claim is only ever
written or released by its owner.
"""

import sqlite3
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy.exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.messages import FireCreated
from delivery.bus.subjects import Subjects
from delivery.planning import SchedulePlan, Skip, fire_id
from delivery.store.engine import Capabilities
from delivery.store.schedules import PlannedSchedule, ScheduleStore
from tests.daemon.helpers import (
    FIRES,
    OUTBOX,
    SCHEDULES,
    WAKEUPS,
    add_project,
    add_schedules,
    count,
    daily,
    rows,
    schedule_row,
    wakeup_row,
)

T = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)
SUBJECTS = Subjects("test")


@pytest.fixture
async def store(engine: AsyncEngine, capabilities: Capabilities) -> ScheduleStore:
    """A store on one due daily schedule ``sch_a`` (next fire at ``T``)."""
    await add_project(engine)
    await add_schedules(
        engine,
        [
            schedule_row(
                "sch_a", cadence=daily("09:00"), created_at=T - timedelta(days=3), next_fire_at=T
            )
        ],
    )
    return ScheduleStore(engine, SUBJECTS, capabilities=capabilities)


async def claim(store: ScheduleStore, owner: str, now: datetime = T) -> list[PlannedSchedule]:
    """Claim what is due at ``now`` for ``owner`` and plan: fire at T, skip T - 1h."""
    claimed = await store.claim_schedules(
        owner, now=now, due_by=now, lease_until=now + LEASE, limit=10
    )
    plan = SchedulePlan(
        fires=(T,),
        skips=(Skip(T - timedelta(hours=1), "outside_active_window"),),
        next_fire_at=T + timedelta(days=1),
        last_fire_at=T,
        disable=False,
    )
    return [PlannedSchedule(row, plan) for row in claimed]


async def schedule(engine: AsyncEngine) -> SimpleNamespace:
    [row] = await rows(
        engine,
        select(
            SCHEDULES.c.version,
            SCHEDULES.c.claimed_by,
            SCHEDULES.c.next_fire_at,
            SCHEDULES.c.last_fire_at,
        ),
    )
    return SimpleNamespace(**row._mapping)


async def test_a_plan_writes_its_fires_state_and_messages_once(engine, store):
    """Applied twice (claimed again in between), a plan's fires and messages exist once."""
    first = await store.apply_plans("sched_a", await claim(store, "sched_a"), now=T)
    fid = fire_id("sch_a", T)
    assert (first.fire_ids, first.skipped, first.conflicts, first.kept) == (
        [fid],
        1,
        0,
        frozenset({"sch_a"}),
    )
    state = await schedule(engine)
    assert (state.version, state.claimed_by, state.last_fire_at) == (2, None, T)
    [message] = await rows(engine, select(OUTBOX.c.msg_id, OUTBOX.c.payload, OUTBOX.c.available_at))
    assert (message.msg_id, message.available_at) == (fid, T - timedelta(milliseconds=1))
    assert FireCreated.model_validate_json(message.payload).fire_id == fid

    # Due again (the replay of a tick whose outcome was already written).
    async with engine.begin() as conn:
        await conn.execute(SCHEDULES.update().values(next_fire_at=T))
    again = await store.apply_plans("sched_a", await claim(store, "sched_a"), now=T)
    assert (again.fire_ids, again.skipped, again.conflicts) == ([], 0, 1)
    assert await count(engine, FIRES) == 2
    assert await count(engine, OUTBOX) == 1


async def test_a_claim_taken_over_after_its_lease_stays_with_the_new_owner(engine, store):
    """The old owner's late plan is dropped as stale, and it does not release the new claim."""
    late = await claim(store, "sched_old")
    taken = await claim(store, "sched_new", now=T + LEASE + timedelta(seconds=1))
    assert [p.row.id for p in taken] == ["sch_a"]

    dropped = await store.apply_plans("sched_old", late, now=T)
    assert (dropped.stale, dropped.kept, dropped.fire_ids) == (["sch_a"], frozenset(), [])
    assert (await schedule(engine)).claimed_by == "sched_new"
    assert await count(engine, FIRES) == 0
    assert await count(engine, OUTBOX) == 0

    kept = await store.apply_plans("sched_new", taken, now=T)
    assert kept.fire_ids == [fire_id("sch_a", T)]


async def test_a_failed_write_leaves_nothing_behind(engine, store):
    """A fire row the database refuses rolls back the version bump and the schedule's state."""
    [planned] = await claim(store, "sched_a")
    broken = SimpleNamespace(**{**planned.row._mapping, "agent_id": None})  # NOT NULL on fires
    with pytest.raises((sqlite3.IntegrityError, sqlalchemy.exc.IntegrityError)):
        await store.apply_plans("sched_a", [PlannedSchedule(broken, planned.plan)], now=T)
    state = await schedule(engine)
    assert (state.version, state.claimed_by, state.next_fire_at) == (1, "sched_a", T)
    assert await count(engine, FIRES) == 0
    assert await count(engine, OUTBOX) == 0


async def test_releasing_claims_frees_the_owners_rows_or_every_row(engine, store):
    """An owner releases only its own claims on schedules and wakeups; ``None`` releases all."""
    async with engine.begin() as conn:
        await conn.execute(
            WAKEUPS.insert(), [wakeup_row("wk_a", T), wakeup_row("wk_b", T + timedelta(seconds=10))]
        )
    await claim(store, "sched_a")
    assert await store.claim_wakeups("sched_a", now=T, lease_until=T + LEASE, limit=10) == ["wk_a"]
    later = T + timedelta(seconds=10)  # wk_a's lease still runs
    assert await store.claim_wakeups("sched_b", now=later, lease_until=later + LEASE, limit=10) == [
        "wk_b"
    ]

    assert await store.release_claims(owner="sched_b") == 1
    claimed = select(WAKEUPS.c.id, WAKEUPS.c.claimed_by).order_by(WAKEUPS.c.id)
    assert [tuple(r) for r in await rows(engine, claimed)] == [("wk_a", "sched_a"), ("wk_b", None)]
    assert (await schedule(engine)).claimed_by == "sched_a"

    assert await store.release_claims(owner=None) == 2
    assert await count(engine, SCHEDULES, SCHEDULES.c.claimed_by.is_not(None)) == 0
    assert await count(engine, WAKEUPS, WAKEUPS.c.claimed_by.is_not(None)) == 0


async def test_a_claim_takes_exactly_the_due_unclaimed_rows_and_returns_their_columns(
    engine, capabilities
):
    """
    Both forms of the claim (SQLite's statement on the driver thread, the Core one) take
    the rows due by ``due_by`` on the real clock and those of advanced pairs due by
    ``now``, unclaimed or with a lease that ended, earliest first up to the limit; and
    return each one's columns as stored.
    """
    await add_project(engine)
    window = {"hours": {"start": "08:00", "end": "20:00"}}

    def row(schedule_id: str, next_fire_at: datetime, **changes: object) -> dict[str, object]:
        return {
            **schedule_row(
                schedule_id,
                cadence=daily("09:00", "Europe/Berlin"),
                active_window=window,
                created_at=T - timedelta(days=3, seconds=17),
                next_fire_at=next_fire_at,
                last_fire_at=T - timedelta(days=1),
            ),
            # Every row names every column (an executemany takes the first row's).
            "claimed_by": None,
            "claimed_until": None,
            "due_at": None,
            "policy_json": None,
            **changes,
        }

    await add_schedules(
        engine,
        [
            row("sch_due", T - timedelta(minutes=5)),
            row("sch_ahead", T + timedelta(seconds=20)),  # within due_by (a lookahead)
            row("sch_later", T + timedelta(minutes=5)),
            row("sch_off", T - timedelta(minutes=4), enabled=False),
            row("sch_held", T - timedelta(minutes=3), claimed_by="other", claimed_until=T + LEASE),
            row(
                "sch_lapsed", T - timedelta(minutes=2), claimed_by="other", claimed_until=T - LEASE
            ),
            # Advanced pairs (their clock 1 h ahead): due by their real instant only.
            row("sch_pair", T + timedelta(minutes=50), due_at=T - timedelta(minutes=10)),
            row("sch_pair_later", T + timedelta(hours=2), due_at=T + timedelta(seconds=10)),
            # The real clock's range leaves out an advanced pair's row by its next_fire_at.
            row("sch_pair_odd", T - timedelta(hours=3), due_at=T + timedelta(minutes=10)),
            row("sch_policy", T - timedelta(minutes=1), policy_json='{"outside_window":"defer"}'),
        ]
        + [row(f"sch_many_{i}", T - timedelta(hours=2, minutes=i)) for i in range(3)],
    )
    store = ScheduleStore(engine, SUBJECTS, capabilities=capabilities)
    claimed = await store.claim_schedules(
        "me", now=T, due_by=T + timedelta(seconds=30), lease_until=T + LEASE, limit=6
    )
    # The six earliest of the real clock's due rows, and the pair's due one.
    assert sorted(r.id for r in claimed) == sorted(
        [f"sch_many_{i}" for i in range(3)] + ["sch_due", "sch_lapsed", "sch_policy", "sch_pair"]
    )
    stored = {
        r.id: r for r in await rows(engine, select(*(SCHEDULES.c[name] for name in CLAIM_FIELDS)))
    }
    for got in claimed:
        assert tuple(getattr(got, name) for name in CLAIM_FIELDS) == tuple(stored[got.id]), got.id
        assert got.next_fire_at.tzinfo is not None
    owners = {
        r.id: r.claimed_by
        for r in await rows(engine, select(SCHEDULES.c.id, SCHEDULES.c.claimed_by))
    }
    assert {i for i, o in owners.items() if o == "me"} == {r.id for r in claimed}
    assert owners["sch_held"] == "other"


CLAIM_FIELDS = (
    "id",
    "project_id",
    "agent_id",
    "user_id",
    "cadence_json",
    "active_window_json",
    "timezone",
    "starts_at",
    "ends_at",
    "anchor_at",
    "updated_at",
    "next_fire_at",
    "due_at",
    "last_fire_at",
    "version",
    "policy_json",
)
