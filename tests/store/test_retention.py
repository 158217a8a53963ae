"""
Retention on both databases: old history goes in batches, what the exactly-once
machinery or a waiting retry still needs stays, and a pruned fire never fires again.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.retention import Retention
from delivery.scheduler import Scheduler
from delivery.store.sql import SqlStore
from delivery.store.tables import (
    CHANNEL_ATTEMPTS,
    CHANNEL_FALLBACKS,
    DELIVERIES,
    FIRES,
    NOTIFICATIONS,
    OUTBOX,
    SCHEDULE_CHANGES,
    SCHEDULES,
    WEBHOOK_ATTEMPTS,
    ScheduleRow,
)
from tests.daemon.helpers import daily, schedule_row

NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD = NOW - timedelta(days=40)
NEW = NOW - timedelta(days=2)


async def ids(engine: AsyncEngine, table: Any, column: Any = None) -> set[Any]:
    async with engine.connect() as conn:
        return set(
            (await conn.execute(select(column if column is not None else table.c.id))).scalars()
        )


def notification(
    project: str, nid: str, *, status: str, consumed_at: datetime | None
) -> dict[str, Any]:
    return {
        "id": nid,
        "project_id": project,
        "agent_id": "a",
        "user_id": "u",
        "source_type": "wakeup",
        "source_id": f"wk_{nid}",
        "event_type": "on_wakeup_ready",
        "check_type": "c",
        "status": status,
        "fire_at": OLD,
        "created_at": OLD,
        "consumed_at": consumed_at,
    }


def fire(project: str, fid: str, at: datetime) -> dict[str, Any]:
    return {
        "id": fid,
        "schedule_id": "sch_x",
        "project_id": project,
        "agent_id": "a",
        "user_id": "u",
        "fire_at": at,
        "status": "fired",
        "created_at": at,
    }


def attempt(project: str, aid: str, at: datetime, retry: datetime | None = None) -> dict[str, Any]:
    return {
        "id": aid,
        "project_id": project,
        "notification_id": "msg_old",
        "agent_id": "a",
        "user_id": "u",
        "kind": "sms",
        "destination": "+1***",
        "status": "failed",
        "next_attempt_at": retry,
        "created_at": at,
    }


async def test_prune_keeps_what_is_still_needed(engine: AsyncEngine) -> None:
    """Old history goes, batch by batch; pending messages and queued retries stay."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", OLD)).id
    async with engine.begin() as conn:
        await conn.execute(
            FIRES.insert(),
            [
                fire(project, "fire_old1", OLD),
                fire(project, "fire_old2", OLD + timedelta(hours=1)),
                fire(project, "fire_old3", OLD + timedelta(hours=2)),
                fire(project, "fire_unsent", OLD - timedelta(hours=1)),
                fire(project, "fire_new", NEW),
            ],
        )
        await conn.execute(
            OUTBOX.insert().values(
                subject="s", msg_id="fire_unsent", payload="{}", created_at=OLD, available_at=OLD
            )
        )
        await conn.execute(
            SCHEDULE_CHANGES.insert(),
            [
                {
                    "id": f"chg_{n}",
                    "schedule_id": "sch_x",
                    "project_id": project,
                    "agent_id": "a",
                    "user_id": "u",
                    "kind": "updated",
                    "fields_json": "[]",
                    "timezone": "UTC",
                    "version": 1,
                    "changed_at": at,
                }
                for n, at in (("old", OLD), ("new", NEW))
            ],
        )
        await conn.execute(
            WEBHOOK_ATTEMPTS.insert(),
            [
                {
                    "id": f"wha_{n}",
                    "delivery_id": "whd_1",
                    "project_id": project,
                    "event_type": "e",
                    "event_id": "msg_old",
                    "attempt_number": 1,
                    "webhook_url": "https://x",
                    "status": "failed",
                    "created_at": at,
                }
                for n, at in (("old1", OLD), ("old2", OLD), ("new", NEW))
            ],
        )
        await conn.execute(
            CHANNEL_ATTEMPTS.insert(),
            [
                attempt(project, "cha_old", OLD),
                attempt(project, "cha_retry", OLD, NOW),
                attempt(project, "cha_new", NEW),
            ],
        )
        await conn.execute(
            CHANNEL_FALLBACKS.insert(),
            [
                {
                    "notification_id": nid,
                    "project_id": project,
                    "agent_id": "a",
                    "user_id": "u",
                    "order_json": '["fcm","email"]',
                    "step": 0,
                    "attempt_number": 1,
                    "step_deadline": at,
                    "next_attempt_at": due,
                    "sending": False,
                    "status": "active" if due else "delivered",
                    "decisions_json": "[]",
                    "created_at": at,
                    "updated_at": at,
                }
                # A finished old row goes; an active one (its next step due) and a
                # recent one stay.
                for nid, at, due in (
                    ("fb_done", OLD, None),
                    ("fb_active", OLD, NOW),
                    ("fb_new", NEW, None),
                )
            ],
        )
        await conn.execute(
            NOTIFICATIONS.insert(),
            [
                notification(project, "msg_consumed", status="consumed", consumed_at=OLD),
                notification(project, "msg_pending", status="pending", consumed_at=None),
                notification(project, "msg_staged", status="staged", consumed_at=None),
                notification(project, "msg_failed", status="failed_generation", consumed_at=None),
                notification(project, "msg_waiting", status="consumed", consumed_at=OLD),
                notification(project, "msg_recent", status="consumed", consumed_at=NEW),
            ],
        )
        await conn.execute(
            DELIVERIES.insert().values(
                id="whd_w",
                project_id=project,
                endpoint_id="whe_1",
                notification_id="msg_waiting",
                event_id="msg_waiting",
                event_type="e",
                status="pending",
                created_at=OLD,
                updated_at=OLD,
            )
        )

    retention = Retention(
        engine, ManualClock(NOW), days=30, batch=2, max_lateness=timedelta(hours=1)
    )
    first = await retention.pass_once()
    assert first.rows["fires"] == 2
    assert first.more  # a full batch: the loop goes again
    report = await retention.prune_all()

    assert report.rows["fires"] == 1
    assert await ids(engine, FIRES) == {"fire_unsent", "fire_new"}
    assert await ids(engine, SCHEDULE_CHANGES) == {"chg_new"}
    assert await ids(engine, WEBHOOK_ATTEMPTS) == {"wha_new"}
    assert await ids(engine, CHANNEL_ATTEMPTS) == {"cha_retry", "cha_new"}
    assert await ids(engine, CHANNEL_FALLBACKS, CHANNEL_FALLBACKS.c.notification_id) == {
        "fb_active",
        "fb_new",
    }
    assert await ids(engine, NOTIFICATIONS) == {
        "msg_pending",
        "msg_staged",
        "msg_failed",
        "msg_waiting",
        "msg_recent",
    }
    again = await retention.prune_all()
    assert again.total == 0


async def test_a_pruned_fire_is_never_fired_again(engine: AsyncEngine) -> None:
    """Forty days of daily fires, the old ones pruned: the scheduler makes none of them again."""
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", OLD)).id
    row = schedule_row("sch_daily", cadence=daily("09:00"), created_at=OLD, project_id=project)
    await store.schedules.insert_schedule(ScheduleRow(**row))
    scheduler = Scheduler(engine, Subjects("ret"), max_lateness=timedelta(hours=1))
    day = OLD.replace(hour=10)
    while day <= NOW:
        await scheduler.tick(day)
        day += timedelta(days=1)
    fired = await ids(engine, FIRES, FIRES.c.fire_at)
    assert len(fired) == 40

    async with engine.begin() as conn:  # the relay published them
        await conn.execute(OUTBOX.update().values(sent_at=OUTBOX.c.created_at))
    clock = ManualClock(NOW)
    report = await Retention(
        engine, clock, days=8, batch=7, max_lateness=timedelta(hours=1)
    ).prune_all()
    assert report.rows["fires"] == 32
    for later in (NOW, NOW + timedelta(minutes=1), NOW + timedelta(hours=2)):
        await scheduler.tick(later)
    left = await ids(engine, FIRES, FIRES.c.fire_at)
    assert min(left) > NOW - timedelta(days=9)
    assert left <= fired
    async with engine.connect() as conn:
        next_fire = (await conn.execute(select(SCHEDULES.c.next_fire_at))).scalar_one()
        old_rows = (
            await conn.execute(
                select(func.count()).where(FIRES.c.fire_at < NOW - timedelta(days=9))
            )
        ).scalar_one()
    assert next_fire == NOW.replace(hour=9)
    assert old_rows == 0


async def test_prune_takes_settled_messages_and_keeps_what_could_still_send(
    engine: AsyncEngine,
) -> None:
    """
    Suppressed, superseded, expired and system messages made before the cutoff go, in
    bounded batches; one that a webhook delivery, channel retry or fallback step still
    waits on stays, as do live (pending, staged) and recent ones.
    """
    store = SqlStore(engine)
    project = (await store.keys.ensure_project("p", OLD)).id

    def settled(nid: str, status: str, **extra: Any) -> dict[str, Any]:
        # Every row the same keys: a multi-row insert takes its columns from the first.
        row = notification(project, nid, status=status, consumed_at=None)
        return {**row, "expires_at": None, "status_reason": None, **extra}

    async with engine.begin() as conn:
        await conn.execute(
            NOTIFICATIONS.insert(),
            [
                settled("msg_consumed", "consumed", consumed_at=OLD),
                settled("msg_suppressed", "suppressed", status_reason="attention_budget"),
                settled("msg_superseded", "superseded", status_reason="supersede_key"),
                settled("msg_expired", "expired", expires_at=OLD + timedelta(hours=1)),
                settled("msg_system", "system", agent_id="", user_id=""),
                # Expired only recently: its deadline is younger than the cutoff.
                settled("msg_expired_late", "expired", expires_at=NEW),
                settled("msg_suppressed_new", "suppressed", created_at=NEW),
                settled("msg_hook_waits", "superseded"),
                settled("msg_retry_waits", "expired", expires_at=OLD),
                settled("msg_fallback_waits", "expired", expires_at=OLD),
                settled("msg_pending", "pending"),
                settled("msg_deferred", "staged", status_reason="deferred_quiet_hours"),
            ],
        )
        await conn.execute(
            DELIVERIES.insert().values(
                id="whd_w",
                project_id=project,
                endpoint_id="whe_1",
                notification_id="msg_hook_waits",
                event_id="msg_hook_waits",
                event_type="e",
                status="pending",
                created_at=OLD,
                updated_at=OLD,
            )
        )
        await conn.execute(
            CHANNEL_ATTEMPTS.insert(),
            [{**attempt(project, "cha_retry", OLD, NOW), "notification_id": "msg_retry_waits"}],
        )
        await conn.execute(
            CHANNEL_FALLBACKS.insert().values(
                notification_id="msg_fallback_waits",
                project_id=project,
                agent_id="a",
                user_id="u",
                order_json='["fcm","email"]',
                step=1,
                attempt_number=1,
                step_deadline=OLD,
                next_attempt_at=NOW,
                sending=False,
                status="active",
                decisions_json="[]",
                created_at=OLD,
                updated_at=OLD,
            )
        )

    retention = Retention(
        engine, ManualClock(NOW), days=30, batch=2, max_lateness=timedelta(hours=1)
    )
    first = await retention.pass_once()
    assert first.rows["notifications"] == 2  # the batch bounds consumed and settled together
    assert first.more
    report = await retention.prune_all()
    assert await ids(engine, NOTIFICATIONS) == {
        "msg_expired_late",
        "msg_suppressed_new",
        "msg_hook_waits",
        "msg_retry_waits",
        "msg_fallback_waits",
        "msg_pending",
        "msg_deferred",
    }
    assert first.rows["notifications"] + report.rows["notifications"] == 5
    assert (await retention.prune_all()).total == 0
