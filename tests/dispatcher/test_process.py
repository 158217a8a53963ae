"""The dispatcher core on SQLite and PostgreSQL: one notification per source, whatever happens."""

import json
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import Composer, CompositionError, TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import IntentBlock, SourceKind, SourceRef, notification_id
from delivery.store.tables import InventoryItemRow, TriggerEventRow, WakeupRow
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 1, 0, 5, tzinfo=UTC)
FIRE_AT = datetime(2026, 5, 2, 1, 0, tzinfo=UTC)


class FailingComposer:
    """A composer whose generation always fails, as an unreachable LLM would."""

    async def compose(self, block: IntentBlock) -> str:
        raise CompositionError("LLM request timed out")

    async def aclose(self) -> None:
        return None


def processor(engine: AsyncEngine, composer: Composer | None = None) -> Processor:
    return Processor(engine, composer or TemplateComposer(), Subjects("tp"), ManualClock(NOW))


async def test_schedule_fire_makes_one_notification_with_payload(engine: AsyncEngine) -> None:
    """A fire becomes one pending notification with the webhook payload's shape."""
    await rows.project(engine)
    await rows.item(engine)
    await rows.schedule(
        engine, inventory_item_id="inv_1", metadata_json=json.dumps({"campaign": "v2"})
    )
    fid = await rows.fire(engine, "sch_1", FIRE_AT)

    result = await processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])

    nid = notification_id(fid)
    assert result.created == [nid]
    [note] = await rows.notifications(engine)
    assert note["status"] == "pending"
    assert note["source_id"] == fid
    assert note["schedule_id"] == "sch_1"
    assert note["event_type"] == "on_recurring_event_due"
    assert note["created_at"] == NOW
    payload = json.loads(note["payload_json"])
    assert payload == {
        "event_id": nid,
        "event_type": "on_recurring_event_due",
        "created_at": "2026-05-02T01:00:05Z",
        "project_id": "proj_1",
        "agent_id": "agent_1",
        "user_id": "user_1",
        "message_id": nid,
        "source_type": "schedule",
        "schedule_id": "sch_1",
        "check_type": "reminder",
        "intent": "check in on how the user is feeling",
        "generated_message": note["generated_message"],
        "fire_at": "2026-05-02T01:00:00Z",
        "fire_at_local": "2026-05-02T09:00:00+08:00",
        "metadata": {"campaign": "v2"},
    }
    assert "Daily Vitamin D (dosage: 1000 IU" in note["generated_message"]
    [out] = await rows.outbox(engine)
    assert (out["subject"], out["msg_id"]) == ("tp.notification.created", nid)
    assert json.loads(out["payload"])["notification_id"] == nid


async def test_processing_twice_makes_one_notification(engine: AsyncEngine) -> None:
    """The same fire processed twice (a redelivery) leaves one notification and one outbox row."""
    await rows.project(engine)
    await rows.schedule(engine)
    fid = await rows.fire(engine, "sch_1", FIRE_AT)
    proc = processor(engine)
    ref = SourceRef(SourceKind.SCHEDULE, fid)

    first = await proc.process([ref, ref])
    second = await proc.process([ref])

    assert (len(first.created), first.duplicates) == (1, [fid])
    assert second.created == []
    assert second.duplicates == [fid]
    assert len(await rows.notifications(engine)) == 1
    assert len(await rows.outbox(engine)) == 1


async def test_deleted_item_omits_reference_section(engine: AsyncEngine) -> None:
    """An inventory item deleted before the fire: the schedule still fires, without the item."""
    await rows.project(engine)
    await rows.schedule(engine, inventory_item_id="inv_gone")
    fid = await rows.fire(engine, "sch_1", FIRE_AT)

    await processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])

    [note] = await rows.notifications(engine)
    assert note["status"] == "pending"
    assert note["generated_message"] == "Check in on how the user is feeling."


async def test_item_of_another_user_is_not_read(engine: AsyncEngine) -> None:
    """An item id pointing at another user's inventory is treated as absent (tenancy)."""
    await rows.project(engine)
    await rows.item(engine, user_id="someone_else")
    await rows.schedule(engine, inventory_item_id="inv_1")
    fid = await rows.fire(engine, "sch_1", FIRE_AT)

    await processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])

    [note] = await rows.notifications(engine)
    assert "Vitamin" not in note["generated_message"]


async def test_item_properties_are_read_live(engine: AsyncEngine) -> None:
    """The item's properties are the ones stored at fire time, not at schedule creation."""
    await rows.project(engine)
    await rows.item(engine)
    await rows.schedule(engine, inventory_item_id="inv_1")
    async with engine.begin() as conn:
        t = rows.table(InventoryItemRow)
        await conn.execute(t.update().values(properties_json=json.dumps({"dosage": "250mg"})))
    fid = await rows.fire(engine, "sch_1", FIRE_AT)

    await processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])

    [note] = await rows.notifications(engine)
    assert note["generated_message"].endswith("Daily Vitamin D (dosage: 250mg).")


async def test_wakeup_executes_once(engine: AsyncEngine) -> None:
    """A pending wakeup gives one notification and becomes executed; a second run does nothing."""
    await rows.project(engine)
    await rows.wakeup(engine, occasion="Sarah's 30th birthday")
    proc = processor(engine)

    first = await proc.process([SourceRef(SourceKind.WAKEUP, "wk_1")])
    second = await proc.process([SourceRef(SourceKind.WAKEUP, "wk_1")])

    assert first.created == [notification_id("wk_1")]
    assert second.duplicates == ["wk_1"]
    wk = await rows.row(engine, WakeupRow, "wk_1")
    assert (wk["status"], wk["executed_at"]) == ("executed", NOW)
    [note] = await rows.notifications(engine)
    assert (note["wakeup_id"], note["event_type"]) == ("wk_1", "on_wakeup_ready")
    payload = json.loads(note["payload_json"])
    assert payload["wakeup_id"] == "wk_1"
    assert "schedule_id" not in payload
    assert payload["fire_at"] == payload["fire_at_local"] == "2026-06-15T09:00:00Z"


async def test_cancelled_wakeup_produces_nothing(engine: AsyncEngine) -> None:
    """A cancelled wakeup stays cancelled and produces no notification (a cancel is final)."""
    await rows.project(engine)
    await rows.wakeup(engine, status="cancelled", cancelled_at=NOW)

    result = await processor(engine).process([SourceRef(SourceKind.WAKEUP, "wk_1")])

    assert result.skipped == {"wk_1": "wakeup cancelled"}
    assert await rows.notifications(engine) == []
    assert await rows.outbox(engine) == []
    assert (await rows.row(engine, WakeupRow, "wk_1"))["status"] == "cancelled"


async def test_trigger_event_is_dispatched(engine: AsyncEngine) -> None:
    """An accepted trigger event gives one on_trigger_event notification, marked dispatched."""
    await rows.project(engine)
    await rows.event(engine)

    await processor(engine).process([SourceRef(SourceKind.EVENT, "evt_1")])

    [note] = await rows.notifications(engine)
    assert (note["trigger_event_id"], note["check_type"]) == ("evt_1", "level_up")
    payload = json.loads(note["payload_json"])
    assert payload["metadata"] == {"new_level": "25", "previous_level": "24"}
    assert payload["source_type"] == "event"
    assert (await rows.row(engine, TriggerEventRow, "evt_1"))["status"] == "dispatched"


async def test_skipped_or_missing_sources_produce_nothing(engine: AsyncEngine) -> None:
    """A skipped fire row, an unknown fire and a fire of a deleted schedule make nothing."""
    await rows.project(engine)
    await rows.schedule(engine)
    skipped = await rows.fire(engine, "sch_1", FIRE_AT, status="skipped")
    orphan = await rows.fire(engine, "sch_deleted", FIRE_AT)

    result = await processor(engine).process(
        [
            SourceRef(SourceKind.SCHEDULE, skipped),
            SourceRef(SourceKind.SCHEDULE, "fire_unknown"),
            SourceRef(SourceKind.SCHEDULE, orphan),
        ]
    )

    assert result.skipped == {
        skipped: "fire skipped",
        "fire_unknown": "fire missing",
        orphan: "schedule deleted",
    }
    assert await rows.notifications(engine) == []


async def test_failed_generation_is_kept_not_published(engine: AsyncEngine) -> None:
    """A composer failure keeps the notification as failed_generation with the error."""
    await rows.project(engine)
    await rows.wakeup(engine)

    result = await processor(engine, FailingComposer()).process(
        [SourceRef(SourceKind.WAKEUP, "wk_1")]
    )

    assert result.failed == [notification_id("wk_1")]
    [note] = await rows.notifications(engine)
    assert note["status"] == "failed_generation"
    assert note["error"] == "LLM request timed out"
    assert note["generated_message"] == ""
    assert (await rows.row(engine, WakeupRow, "wk_1"))["status"] == "executed"
    assert await rows.outbox(engine) == []


class CancellingComposer:
    """Cancels the wakeup while its message is being composed: the API's DELETE racing us."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def compose(self, block: IntentBlock) -> str:
        async with self.engine.begin() as conn:
            await conn.execute(
                rows.table(WakeupRow).update().values(status="cancelled", cancelled_at=NOW)
            )
        return "too late"

    async def aclose(self) -> None:
        return None


async def test_cancel_racing_the_dispatcher_wins(engine: AsyncEngine) -> None:
    """A wakeup cancelled between read and write produces nothing and stays cancelled."""
    await rows.project(engine)
    await rows.wakeup(engine)

    result = await processor(engine, CancellingComposer(engine)).process(
        [SourceRef(SourceKind.WAKEUP, "wk_1")]
    )

    assert result.skipped == {"wk_1": "wakeup no longer pending"}
    assert result.created == []
    assert await rows.notifications(engine) == []
    assert await rows.outbox(engine) == []
    assert (await rows.row(engine, WakeupRow, "wk_1"))["status"] == "cancelled"
