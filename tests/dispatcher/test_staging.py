"""
Composing ahead (delivery.store.staging) on SQLite and PostgreSQL: a fire the scheduler
staged is composed at once into a hidden notification, shown only from its fire
instant, and composed again when the API changes its schedule or item first.
"""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.messages import FireCreated
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.app import decode
from delivery.dispatcher.composers import Composer, TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef, notification_id
from delivery.store.notifications import ConsumeOutcome
from delivery.store.sql import SqlStore
from delivery.store.staging import promote
from delivery.store.tables import NotificationRow, OutboxRow, ScheduleRow
from delivery.workbench import Pair, advance_time
from tests.dispatcher import rows
from tests.dispatcher.test_process import FailingComposer

NOW = datetime(2026, 5, 2, 1, 0, 30, tzinfo=UTC)
FIRE_AT = datetime(2026, 5, 2, 1, 1, tzinfo=UTC)
SUBJECTS = Subjects("tp")


def processor(engine: AsyncEngine, composer: Composer | None = None) -> Processor:
    return Processor(engine, composer or TemplateComposer(), SUBJECTS, ManualClock(NOW))


async def staged_fire(engine: AsyncEngine, schedule_id: str = "sch_1") -> str:
    """A fire row as the scheduler's lookahead writes it: before its instant."""
    return await rows.fire(engine, schedule_id, FIRE_AT, created_at=NOW - timedelta(seconds=5))


async def staged_message(engine: AsyncEngine) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """One schedule whose fire is staged and composed: (fire id, its row, its outbox row)."""
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await staged_fire(engine)
    note = await compose_staged(engine, fid)
    [out] = await rows.outbox(engine)
    return fid, note, out


async def compose_staged(engine: AsyncEngine, fid: str) -> dict[str, Any]:
    await processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])
    return await rows.row(engine, NotificationRow, notification_id(fid))


async def restage_refs(engine: AsyncEngine) -> list[SourceRef]:
    """The restage messages queued, decoded as the dispatcher decodes them."""
    return [
        decode(SourceKind.SCHEDULE, o["payload"].encode())
        for o in await rows.outbox(engine)
        if ":restage:" in o["msg_id"]
    ]


async def put_back(engine: AsyncEngine, note: dict[str, Any], outbox: dict[str, Any]) -> None:
    """A dispatcher that read the old state writes its staged row after the API's write."""
    await rows.insert(engine, NotificationRow, **note)
    await rows.insert(engine, OutboxRow, **{k: v for k, v in outbox.items() if k != "id"})


async def test_a_fire_ahead_is_staged_hidden_and_shown_from_its_instant(
    engine: AsyncEngine,
) -> None:
    """Composed at once but invisible to every read; promoted, it joins the queue."""
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await staged_fire(engine)
    nid = notification_id(fid)

    note = await compose_staged(engine, fid)
    assert (note["status"], note["created_at"]) == ("staged", FIRE_AT)
    [out] = await rows.outbox(engine)
    assert (out["msg_id"], out["available_at"], out["sent_at"]) == (nid, FIRE_AT, None)

    store = SqlStore(engine)
    assert (
        await store.notifications.list_queue(
            "proj_1", "agent_1", status="pending", user_id=None, limit=50
        )
        == []
    )
    assert await store.notifications.notification_history("proj_1", "agent_1", limit=50) == []
    assert (
        await store.notifications.list_project_notifications(
            "proj_1", agent_id=None, event_type=None, ack_status=None, limit=50
        )
        == []
    )
    assert await store.notifications.consume_notification("proj_1", "agent_1", nid, NOW) is (
        ConsumeOutcome.NOT_FOUND
    )
    assert await store.notifications.acknowledge("proj_1", [nid], NOW) == 0
    assert (
        await store.notifications.acknowledge_all("proj_1", agent_id=None, event_type=None, now=NOW)
        == 0
    )

    assert await promote(engine, FIRE_AT - timedelta(microseconds=1)) == 0
    shown = FIRE_AT + timedelta(milliseconds=300)
    assert await promote(engine, shown) == 1
    assert await promote(engine, shown) == 0
    note = await rows.row(engine, NotificationRow, nid)
    assert (note["status"], note["created_at"]) == ("pending", shown)
    assert json.loads(note["payload_json"])["created_at"] == "2026-05-02T01:01:00Z"
    [queued] = await store.notifications.list_queue(
        "proj_1", "agent_1", status="pending", user_id=None, limit=50
    )
    assert queued["id"] == nid
    assert await store.notifications.consume_notification("proj_1", "agent_1", nid, shown) is (
        ConsumeOutcome.CONSUMED
    )


async def test_a_staged_failed_generation_is_promoted_as_failed(engine: AsyncEngine) -> None:
    """A composer failure while staged stays hidden, then shows as failed_generation."""
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await staged_fire(engine)

    await processor(engine, FailingComposer()).process([SourceRef(SourceKind.SCHEDULE, fid)])

    note = await rows.row(engine, NotificationRow, notification_id(fid))
    assert (note["status"], note["error"]) == ("staged", "LLM request timed out")
    assert await rows.outbox(engine) == []
    assert await promote(engine, FIRE_AT) == 1
    note = await rows.row(engine, NotificationRow, notification_id(fid))
    assert note["status"] == "failed_generation"


async def test_a_schedule_change_before_the_instant_recomposes_the_message(
    engine: AsyncEngine,
) -> None:
    """
    A PATCH between staging and the fire instant: the message shows the new
    intent, even over a staged row a racing dispatcher wrote from the old one.
    """
    fid, old, old_out = await staged_message(engine)
    store = SqlStore(engine, subjects=SUBJECTS)
    schedule = ScheduleRow(**await rows.row(engine, ScheduleRow, "sch_1"))

    changed = {"intent": "ask how the new job went", "version": schedule.version + 1}
    assert await store.schedules.update_schedule(schedule, changed, schedule.version, now=NOW)

    assert await rows.count(engine, NotificationRow) == 0
    [ref] = await restage_refs(engine)
    assert (ref.id, ref.replace_staged) == (fid, True)
    [restage] = [o for o in await rows.outbox(engine) if ":restage:" in o["msg_id"]]
    assert restage["subject"] == SUBJECTS.fire_created
    assert FireCreated.model_validate_json(restage["payload"]).fire_at == FIRE_AT

    await put_back(engine, old, old_out)
    result = await processor(engine).process([ref])

    assert result.created == [notification_id(fid)]
    [note] = await rows.notifications(engine)
    assert (note["status"], note["intent"]) == ("staged", "ask how the new job went")
    created = [o for o in await rows.outbox(engine) if o["msg_id"] == note["id"]]
    assert [(o["available_at"], o["sent_at"]) for o in created] == [(FIRE_AT, None)]
    # The fire's own message, redelivered later, changes nothing.
    again = await processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])
    assert again.duplicates == [fid]


async def test_an_item_update_recomposes_staged_fires_that_use_it(engine: AsyncEngine) -> None:
    """The message shows the item as it is at the fire instant; other schedules are untouched."""
    await rows.project(engine)
    await rows.item(engine)
    await rows.schedule(engine, inventory_item_id="inv_1")
    await rows.schedule(engine, "sch_2")
    linked, other = await staged_fire(engine), await staged_fire(engine, "sch_2")
    assert "1000 IU" in (await compose_staged(engine, linked))["generated_message"]
    untouched = await compose_staged(engine, other)
    store = SqlStore(engine, subjects=SUBJECTS)

    await store.inventory.update_item(
        "proj_1", "agent_1", "user_1", "inv_1", properties={"dosage": "250mg"}, fields={}, now=NOW
    )

    [ref] = await restage_refs(engine)
    assert ref.id == linked
    await processor(engine).process([ref])
    note = await rows.row(engine, NotificationRow, notification_id(linked))
    assert "dosage: 250mg" in note["generated_message"]
    assert await rows.row(engine, NotificationRow, notification_id(other)) == untouched

    assert await store.inventory.delete_item("proj_1", "agent_1", "user_1", "inv_1", now=NOW)
    [_, ref] = await restage_refs(engine)
    await processor(engine).process([ref])
    note = await rows.row(engine, NotificationRow, notification_id(linked))
    assert "Vitamin" not in note["generated_message"]


async def test_a_deleted_schedule_sends_nothing_even_after_a_racing_write(
    engine: AsyncEngine,
) -> None:
    """Deleted before its instant: the staged message goes, and so does a racing one."""
    fid, old, old_out = await staged_message(engine)
    store = SqlStore(engine, subjects=SUBJECTS)

    assert await store.schedules.delete_schedule("proj_1", "agent_1", "user_1", "sch_1", now=NOW)
    [ref] = await restage_refs(engine)
    await put_back(engine, old, old_out)
    result = await processor(engine).process([ref])

    assert result.created == []
    assert result.skipped == {fid: "fire missing"}
    assert await rows.notifications(engine) == []
    assert [o for o in await rows.outbox(engine) if o["msg_id"] == old["id"]] == []
    assert await promote(engine, FIRE_AT) == 0


async def test_a_change_after_the_instant_leaves_the_message_alone(engine: AsyncEngine) -> None:
    """Fires already due are not restaged: their message shows the state at their instant."""
    fid, _, _ = await staged_message(engine)
    store = SqlStore(engine, subjects=SUBJECTS)
    schedule = ScheduleRow(**await rows.row(engine, ScheduleRow, "sch_1"))

    changed = {"intent": "something else", "version": schedule.version + 1}
    assert await store.schedules.update_schedule(schedule, changed, schedule.version, now=FIRE_AT)

    assert await restage_refs(engine) == []
    note = await rows.row(engine, NotificationRow, notification_id(fid))
    assert (note["status"], note["intent"]) == ("staged", "check in on how the user is feeling")


async def test_advance_time_over_a_staged_fire_replaces_its_staged_message(
    engine: AsyncEngine,
) -> None:
    """Advance-time fires a staged fire itself; no hidden copy is left to show later."""
    await rows.project(engine)
    daily = json.dumps(
        {"simple": {"frequency": "daily", "times": ["01:01"]}, "timezone": "UTC"}, sort_keys=True
    )
    await rows.schedule(
        engine, cadence_json=daily, timezone="UTC", next_fire_at=FIRE_AT, anchor_at=rows.T0
    )
    fid = await staged_fire(engine)
    await compose_staged(engine, fid)

    pair = Pair("proj_1", "agent_1", "user_1")
    await advance_time(engine, TemplateComposer(), SUBJECTS, ManualClock(NOW), pair, 1)

    note = await rows.row(engine, NotificationRow, notification_id(fid))
    assert (note["status"], note["created_at"]) == ("pending", FIRE_AT)
    created = [o for o in await rows.outbox(engine) if o["msg_id"] == note["id"]]
    assert [o["available_at"] for o in created] == [NOW]
