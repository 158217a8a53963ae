"""
Scheduler tick + outbox relay on the real store (SQLite and PostgreSQL) and a real
JetStream: every due fire gives exactly one fire row and one published message.
"""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from delivery.api.routes.schedules import _patched, schedule_out
from delivery.api.schemas import SchedulePatch
from delivery.bus.messages import FireCreated, WakeupDue
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.outbox import OutboxRelay
from delivery.planning import MISSED_MAX_LATENESS, fire_id
from delivery.scheduler import Scheduler
from delivery.store.tables import ScheduleRow
from tests.daemon.helpers import (
    FIRES,
    NOTIFICATIONS,
    OUTBOX,
    SCHEDULES,
    WAKEUPS,
    add_schedules,
    count,
    daily,
    due_daily_rows,
    rows,
    schedule_row,
    wakeup_row,
)

T = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
CREATED = T - timedelta(days=3)


async def test_each_due_fire_gives_one_fire_row_and_one_message(engine, bus, project):
    """Due schedules in mixed zones fire once each; relaying twice publishes each once."""
    await add_schedules(engine, due_daily_rows(25, T, CREATED))
    clock = ManualClock(T + timedelta(seconds=1))
    scheduler = Scheduler(engine, bus.subjects, claim_batch=10)
    result = await scheduler.drain(clock.now())
    assert result.claimed == 25
    assert result.fired == 25
    assert result.conflicts == 0
    assert len(set(result.fire_ids)) == 25
    assert await count(engine, FIRES, FIRES.c.status == "fired") == 25
    assert await count(engine, OUTBOX) == 25
    outbox = await rows(engine, select(OUTBOX.c.msg_id, OUTBOX.c.subject, OUTBOX.c.payload))
    assert {r.msg_id for r in outbox} == set(result.fire_ids)
    assert {r.subject for r in outbox} == {bus.subjects.fire_created}
    payload = FireCreated.model_validate_json(outbox[0].payload)
    assert payload.fire_id == outbox[0].msg_id
    assert payload.fire_at == T
    assert payload.fire_id == fire_id(payload.schedule_id, T)

    # Nothing is due any more at the same instant: the next fire is tomorrow.
    again = await scheduler.drain(clock.now())
    assert again.claimed == 0
    next_fires = await rows(engine, select(SCHEDULES.c.next_fire_at, SCHEDULES.c.version))
    assert {r.next_fire_at for r in next_fires} == {T + timedelta(days=1)}
    assert {r.version for r in next_fires} == {2}

    relay = OutboxRelay(engine, bus.js, clock, batch=10)
    first = await relay.drain()
    assert (first.published, first.duplicates, first.failed) == (25, 0, 0)
    assert (await relay.drain()).published == 0
    assert await count(engine, OUTBOX, OUTBOX.c.sent_at.is_(None)) == 0

    # A crash between publish and stamp: the rows are unsent again and get republished;
    # JetStream drops every copy (Nats-Msg-Id = fire id).
    async with engine.begin() as conn:
        await conn.execute(update(OUTBOX).values(sent_at=None))
    replay = await relay.drain()
    assert (replay.published, replay.duplicates) == (25, 25)
    assert await bus.stream_messages() == 25


@pytest.mark.parametrize("lookahead_s", [0, 59])
async def test_catch_up_within_and_beyond_max_lateness(engine, bus, project, lookahead_s):
    """
    After downtime, fires within the max lateness fire once; older ones are recorded
    skipped. The lookahead does not move the lateness cutoff.
    """
    hourly = {"cron": "0 * * * *", "timezone": "Europe/Berlin"}
    await add_schedules(
        engine, [schedule_row("sch_h", cadence=hourly, created_at=CREATED, next_fire_at=T)]
    )
    now = T + timedelta(hours=5, minutes=30)
    scheduler = Scheduler(
        engine,
        bus.subjects,
        max_lateness=timedelta(hours=1),
        lookahead=timedelta(seconds=lookahead_s),
    )
    result = await scheduler.drain(now)
    assert result.fired == 1
    fires = await rows(
        engine,
        select(FIRES.c.fire_at, FIRES.c.status, FIRES.c.skip_reason).order_by(FIRES.c.fire_at),
    )
    assert [(f.fire_at, f.status, f.skip_reason) for f in fires] == [
        *[(T + timedelta(hours=h), "skipped", MISSED_MAX_LATENESS) for h in range(5)],
        (T + timedelta(hours=5), "fired", None),
    ]
    [schedule] = await rows(engine, select(SCHEDULES))
    assert schedule.next_fire_at == T + timedelta(hours=6)
    assert schedule.last_fire_at == T + timedelta(hours=5)
    assert schedule.claimed_by is None
    assert schedule.claimed_until is None
    assert await count(engine, OUTBOX) == 1


async def test_active_window_skips_are_recorded_with_reason(engine, bus, project):
    """Ticks outside the active window between two fires are recorded as skipped, not fired."""
    hourly = {"cron": "0 * * * *", "timezone": "UTC"}
    window = {"hours": {"start": "09:00", "end": "17:00"}}
    last = T.replace(hour=16)
    next_at = T.replace(hour=9) + timedelta(days=1)
    row = schedule_row(
        "sch_w",
        cadence=hourly,
        active_window=window,
        created_at=CREATED,
        next_fire_at=next_at,
        last_fire_at=last,
    )
    await add_schedules(engine, [row])
    result = await Scheduler(engine, bus.subjects).drain(next_at)
    assert result.fired == 1
    assert result.skipped == 16
    skipped = await rows(
        engine,
        select(FIRES.c.fire_at, FIRES.c.skip_reason)
        .where(FIRES.c.status == "skipped")
        .order_by(FIRES.c.fire_at),
    )
    assert [s.fire_at for s in skipped] == [last + timedelta(hours=h) for h in range(1, 17)]
    assert {s.skip_reason for s in skipped} == {"outside_active_window"}


async def test_dst_gap_skip_is_recorded(engine, bus, project):
    """A daily 02:30 in New York on the spring-forward day is recorded as a dst_gap skip."""
    cadence = daily("02:30", "America/New_York")
    last = datetime(2026, 3, 7, 7, 30, tzinfo=UTC)  # 02:30 EST
    next_at = datetime(2026, 3, 9, 6, 30, tzinfo=UTC)  # 02:30 EDT
    await add_schedules(
        engine,
        [
            schedule_row(
                "sch_d",
                cadence=cadence,
                created_at=CREATED - timedelta(days=90),
                next_fire_at=next_at,
                last_fire_at=last,
            )
        ],
    )
    result = await Scheduler(engine, bus.subjects).drain(next_at + timedelta(seconds=2))
    assert (result.fired, result.skipped) == (1, 1)
    [skip] = await rows(engine, select(FIRES).where(FIRES.c.status == "skipped"))
    assert skip.skip_reason == "dst_gap"
    assert skip.fire_at.date().isoformat() == "2026-03-08"


async def test_ends_at_passing_disables_and_keeps_the_row(engine, bus, project):
    """A schedule past its ends_at is disabled with no next fire, and the row stays."""
    ends = T + timedelta(minutes=10)
    await add_schedules(
        engine,
        [
            schedule_row(
                "sch_e", cadence=daily("09:00"), created_at=CREATED, next_fire_at=T, ends_at=ends
            )
        ],
    )
    result = await Scheduler(engine, bus.subjects).drain(T + timedelta(minutes=30))
    assert (result.fired, result.disabled) == (1, 1)
    [schedule] = await rows(engine, select(SCHEDULES))
    assert schedule.enabled is False
    assert schedule.next_fire_at is None
    assert (await Scheduler(engine, bus.subjects).drain(T + timedelta(days=3))).claimed == 0


async def test_reaching_ends_at_bumps_updated_at_and_firing_does_not(engine, bus, project):
    """
    The scheduler's disable at ``ends_at`` is a change the API shows, so ``updated_at``
    moves to that pass; a fire that leaves the schedule enabled keeps it.
    """
    ends = T + timedelta(days=1, minutes=10)
    await add_schedules(
        engine,
        [
            schedule_row(
                "sch_e", cadence=daily("09:00"), created_at=CREATED, next_fire_at=T, ends_at=ends
            )
        ],
    )
    [before] = await rows(engine, select(SCHEDULES))
    fired_at = T + timedelta(minutes=5)
    assert (await Scheduler(engine, bus.subjects).drain(fired_at)).fired == 1
    [still] = await rows(engine, select(SCHEDULES))
    assert (still.enabled, still.updated_at) == (True, before.updated_at)
    disabled_at = T + timedelta(days=1, minutes=30)
    result = await Scheduler(engine, bus.subjects).drain(disabled_at)
    assert (result.fired, result.disabled) == (1, 1)
    [schedule] = await rows(engine, select(SCHEDULES))
    assert schedule.enabled is False
    assert schedule.updated_at == disabled_at


async def test_a_last_fire_staged_by_the_lookahead_keeps_the_schedule_enabled_until_it(
    engine, bus, project
):
    """
    Staging the last fire before ``ends_at`` disables the row a lookahead early; the
    wire (and a PATCH that does not touch ``enabled``) still sees it enabled until then.
    """
    ends = T + timedelta(minutes=10)
    await add_schedules(
        engine,
        [
            schedule_row(
                "sch_l", cadence=daily("09:00"), created_at=CREATED, next_fire_at=T, ends_at=ends
            )
        ],
    )
    staged_at = T - timedelta(seconds=40)
    scheduler = Scheduler(engine, bus.subjects, lookahead=timedelta(seconds=59))
    assert (await scheduler.drain(staged_at)).disabled == 1
    async with engine.connect() as conn:
        stored = (await conn.execute(select(SCHEDULES))).mappings().one()
    row = ScheduleRow.model_validate(dict(stored))
    assert row.enabled is False
    before = schedule_out(row, staged_at)
    assert (before.enabled, before.next_fire_at) == (True, "2026-06-01T09:00:00Z")
    after = schedule_out(row, T + timedelta(seconds=1))
    assert (after.enabled, after.next_fire_at) == (False, "")

    patch = SchedulePatch(ends_at="2026-06-03T09:30:00Z")
    changes, timing = _patched(row, patch, {"ends_at"}, staged_at)
    assert timing is True
    assert changes["enabled"] is True
    assert changes["next_fire_at"] == T


async def test_a_schedule_changed_between_claim_and_write_is_dropped_then_replanned(
    engine, bus, project
):
    """An API write between claim and write wins; the next tick plans from the new state."""
    await add_schedules(
        engine, [schedule_row("sch_p", cadence=daily("09:00"), created_at=CREATED, next_fire_at=T)]
    )
    scheduler = Scheduler(engine, bus.subjects)
    claimed = await scheduler.claim_schedules(T)
    assert len(claimed) == 1
    # The API PATCHes the cadence: version bump and a recomputed next_fire_at.
    async with engine.begin() as conn:
        await conn.execute(
            update(SCHEDULES).values(
                version=SCHEDULES.c.version + 1,
                cadence_json='{"simple":{"frequency":"daily","times":["10:00"]},"timezone":"UTC"}',
                next_fire_at=T + timedelta(hours=1),
                updated_at=T,
            )
        )
    result = await scheduler.apply_schedules(claimed, T)
    assert (result.stale, result.fired) == (1, 0)
    assert await count(engine, FIRES) == 0
    [schedule] = await rows(engine, select(SCHEDULES))
    assert schedule.claimed_by is None
    assert schedule.version == 3  # the API bump, then the dropped tick bumps once more
    later = await scheduler.drain(T + timedelta(hours=1))
    assert later.fired == 1
    [fire] = await rows(engine, select(FIRES))
    assert fire.fire_at == T + timedelta(hours=1)


async def test_due_wakeups_are_queued_once_and_re_armed_after_the_lease(engine, bus, project):
    """A due pending wakeup gets one wakeup.due message; only pending and due ones are taken."""
    async with engine.begin() as conn:
        await conn.execute(
            WAKEUPS.insert(),
            [
                wakeup_row("wk_due", T),
                wakeup_row("wk_later", T + timedelta(hours=1)),
                wakeup_row("wk_done", T - timedelta(hours=1), status="executed"),
                wakeup_row("wk_cancelled", T - timedelta(hours=1), status="cancelled"),
            ],
        )
    scheduler = Scheduler(engine, bus.subjects, lease=timedelta(seconds=30))
    relay = OutboxRelay(engine, bus.js, ManualClock(T))
    result = await scheduler.drain(T)
    assert result.wakeups == 1
    [row] = await rows(engine, select(OUTBOX))
    assert (row.msg_id, row.subject) == ("wk_due", bus.subjects.wakeup_due)
    assert WakeupDue.model_validate_json(row.payload).fire_at == T
    assert (await scheduler.drain(T + timedelta(seconds=10))).wakeups == 0
    assert (await relay.drain()).published == 1
    # Still pending after the lease (the dispatcher never got to it): re-armed and
    # republished, and JetStream drops the copy.
    assert (await scheduler.drain(T + timedelta(seconds=31))).wakeups == 1
    assert await count(engine, OUTBOX) == 1
    again = await relay.drain()
    assert (again.published, again.duplicates) == (1, 1)
    assert await bus.stream_messages() == 1


async def test_embedded_start_releases_claims_of_a_dead_process(engine, bus, project):
    """Claims left by a killed process are released at start-up instead of waiting out the lease."""
    await add_schedules(
        engine, [schedule_row("sch_c", cadence=daily("09:00"), created_at=CREATED, next_fire_at=T)]
    )
    dead = Scheduler(engine, bus.subjects, lease=timedelta(hours=1))
    assert len(await dead.claim_schedules(T)) == 1
    fresh = Scheduler(engine, bus.subjects)
    assert (await fresh.drain(T)).claimed == 0
    assert await fresh.release_claims(everyone=True) == 1
    assert (await fresh.drain(T)).fired == 1


async def test_a_message_jetstream_refuses_stays_unsent(engine, bus, project):
    """A row whose publish is not acknowledged keeps sent_at NULL and is retried later."""
    async with engine.begin() as conn:
        await conn.execute(
            OUTBOX.insert(),
            [
                {
                    "subject": f"{bus.subjects.prefix}x.nowhere",
                    "msg_id": "m1",
                    "payload": "{}",
                    "created_at": T,
                    "available_at": T,
                },
                {
                    "subject": bus.subjects.fire_created,
                    "msg_id": "m2",
                    "payload": "{}",
                    "created_at": T,
                    "available_at": T,
                },
            ],
        )
    relay = OutboxRelay(engine, bus.js, ManualClock(T), publish_timeout_s=2)
    result = await relay.relay_once()
    assert (result.published, result.failed) == (1, 1)
    [unsent] = await rows(engine, select(OUTBOX.c.msg_id).where(OUTBOX.c.sent_at.is_(None)))
    assert unsent.msg_id == "m1"


async def test_lookahead_composes_fires_early_and_shows_them_at_their_instant(engine, bus, project):
    """
    With a lookahead, fires due soon are written early (fire row, schedule state,
    outbox entry) and published at once; the dispatcher composes them into
    hidden notifications, and at the fire instant the relay shows them and only
    then publishes their notification.created.
    """
    await add_schedules(engine, due_daily_rows(3, T, CREATED))
    scheduler = Scheduler(engine, bus.subjects, lookahead=timedelta(seconds=30))
    # Further ahead than the lookahead: nothing is claimed yet.
    assert (await scheduler.drain(T - timedelta(seconds=31))).claimed == 0

    early = T - timedelta(seconds=20)
    result = await scheduler.drain(early)
    assert (result.claimed, result.fired, result.next_release) == (3, 3, T)
    fires = await rows(engine, select(FIRES.c.fire_at, FIRES.c.created_at, FIRES.c.status))
    assert {(f.fire_at, f.created_at, f.status) for f in fires} == {(T, early, "fired")}
    schedules = await rows(
        engine,
        select(SCHEDULES.c.next_fire_at, SCHEDULES.c.last_fire_at, SCHEDULES.c.staged_fire_at),
    )
    assert {tuple(r) for r in schedules} == {(T + timedelta(days=1), T, T)}
    outbox = await rows(engine, select(OUTBOX.c.created_at, OUTBOX.c.available_at))
    assert {tuple(r) for r in outbox} == {(early, early)}

    clock = ManualClock(early)
    relay = OutboxRelay(engine, bus.js, clock)
    assert (await relay.drain()).published == 3
    processor = Processor(engine, TemplateComposer(), bus.subjects, clock)
    made = await processor.process([SourceRef(SourceKind.SCHEDULE, f) for f in result.fire_ids])
    assert len(made.created) == 3
    statuses = select(NOTIFICATIONS.c.status, NOTIFICATIONS.c.created_at)
    assert {tuple(r) for r in await rows(engine, statuses)} == {("staged", T)}

    clock.set(T - timedelta(microseconds=1))
    assert (await relay.drain()).published == 0
    assert await bus.stream_messages() == 3
    assert {r.status for r in await rows(engine, statuses)} == {"staged"}
    shown = T + timedelta(milliseconds=40)
    clock.set(shown)
    assert (await relay.drain()).published == 3
    assert await bus.stream_messages() == 6
    assert {tuple(r) for r in await rows(engine, statuses)} == {("pending", shown)}
    # Staged once: at the fire instant nothing is due again.
    assert (await scheduler.drain(T)).claimed == 0


async def test_a_fire_planned_late_is_relayed_before_the_messages_of_its_instant(
    engine, bus, project
):
    """
    A burst's fires staged after their instant go out before the notification.created
    entries that instant released, so the queue fills before the fan-out.
    """
    async with engine.begin() as conn:
        await conn.execute(
            OUTBOX.insert(),
            [
                {
                    "subject": bus.subjects.notification_created,
                    "msg_id": f"msg_{i}",
                    "payload": "{}",
                    "created_at": T - timedelta(seconds=30),
                    "available_at": T,
                }
                for i in range(3)
            ],
        )
    await add_schedules(engine, due_daily_rows(2, T, CREATED))
    late = T + timedelta(seconds=5)
    result = await Scheduler(engine, bus.subjects).drain(late)
    assert result.fired == 2

    relay = OutboxRelay(engine, bus.js, ManualClock(late), batch=2)
    assert (await relay.relay_once()).published == 2
    sent = await rows(engine, select(OUTBOX.c.subject).where(OUTBOX.c.sent_at.is_not(None)))
    assert [r.subject for r in sent] == [bus.subjects.fire_created] * 2
    assert (await relay.drain()).published == 3


def test_lookahead_is_bounded_below_a_minute(engine):
    """Under a minute at most one future fire is staged per schedule (fires are on minutes)."""
    subjects = Subjects("test")
    for bad in (timedelta(seconds=-1), timedelta(seconds=60)):
        with pytest.raises(ValueError, match="lookahead"):
            Scheduler(engine, subjects, lookahead=bad)


async def test_a_burst_is_relayed_once_each_with_a_row_committed_mid_drain(engine, bus, project):
    """
    A row committed while a burst drains, with an earlier available_at than the
    rows already published, is still published; nothing is published twice.
    """

    def outbox(i: int, at: datetime) -> dict[str, object]:
        return {
            "subject": bus.subjects.fire_created,
            "msg_id": f"burst{i}",
            "payload": "{}",
            "created_at": at,
            "available_at": at,
        }

    async with engine.begin() as conn:
        await conn.execute(
            OUTBOX.insert(), [outbox(i, T + timedelta(seconds=i)) for i in range(35)]
        )
    relay = OutboxRelay(engine, bus.js, ManualClock(T + timedelta(minutes=1)), batch=10)
    first = await relay.relay_once()
    assert (first.published, first.more) == (10, True)
    # Committed late with an instant before the first batch's last row.
    async with engine.begin() as conn:
        await conn.execute(OUTBOX.insert(), [outbox(99, T + timedelta(seconds=2, microseconds=1))])
    rest = await relay.drain()
    again = await relay.drain()
    assert first.published + rest.published + again.published == 36
    assert first.duplicates + rest.duplicates + again.duplicates == 0
    assert await count(engine, OUTBOX, OUTBOX.c.sent_at.is_(None)) == 0
    assert await bus.stream_messages() == 36
