"""
The dispatcher's core: a batch of fire / wakeup / event ids -> exactly one notification each.

Read the rows, build the intent blocks, compose (outside any transaction, so
a slow LLM never holds a lock), then in ONE transaction: move wakeups
pending -> executed, mark trigger events dispatched, insert the notifications
(unique on ``source_id``) and queue one ``notification.created`` outbox row per
new notification (DESIGN invariants 2 and 3). Running a batch twice, or two
dispatchers running it at once, leaves the same rows as running it once.
"""

import asyncio
import json
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from sqlalchemy import Table, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.bus.messages import NotificationCreated
from delivery.bus.subjects import Subjects
from delivery.cadence.instants import format_local, format_utc
from delivery.clock import Clock
from delivery.dispatcher.compose import event_block, schedule_block, wakeup_block
from delivery.dispatcher.composers import Composer, CompositionError
from delivery.domain import (
    EVENT_TYPES,
    Draft,
    InventoryItem,
    SourceKind,
    SourceRef,
    notification_id,
)
from delivery.store import bulk, direct
from delivery.store.engine import is_sqlite, write_transaction
from delivery.store.staging import STAGED, drop_staged
from delivery.store.tables import (
    FireRow,
    InventoryItemRow,
    NotificationRow,
    OutboxRow,
    ScheduleRow,
    TriggerEventRow,
    WakeupRow,
)

log = structlog.get_logger(__name__)

FIRES: Table = FireRow.__table__  # type: ignore[attr-defined]
SCHEDULES: Table = ScheduleRow.__table__  # type: ignore[attr-defined]
WAKEUPS: Table = WakeupRow.__table__  # type: ignore[attr-defined]
EVENTS: Table = TriggerEventRow.__table__  # type: ignore[attr-defined]
ITEMS: Table = InventoryItemRow.__table__  # type: ignore[attr-defined]
NOTIFICATIONS: Table = NotificationRow.__table__  # type: ignore[attr-defined]
OUTBOX: Table = OutboxRow.__table__  # type: ignore[attr-defined]

COMPOSE_CONCURRENCY = 32
"""Composer calls in flight per batch (bounds LLM fan-out; free for the template)."""


@dataclass(slots=True)
class BatchResult:
    """
    What one batch did (STYLE section 3: a bounded run returns what it did).

    Attributes:
        created: ids of notifications this batch inserted (pending or failed_generation).
        failed: the subset of ``created`` kept as ``failed_generation``.
        duplicates: source ids that already had their notification (redeliveries).
        skipped: source id -> why nothing was made (cancelled wakeup, missing row, ...).
    """

    created: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def parse_json_object(text: str | None) -> dict[str, Any]:
    """A stored JSON object column; ``None``, ``""`` or a non-object reads as ``{}``."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _json_list(text: str | None) -> list[Mapping[str, Any]]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    return [m for m in value if isinstance(m, dict)]


def inventory_item(row: Mapping[str, Any] | None, owner: Mapping[str, Any]) -> InventoryItem | None:
    """
    The block's view of an inventory row, or ``None`` when it is gone or not the owner's.

    The owner check keeps a forged ``inventory_item_id`` from reading another
    tenant's or user's item (DESIGN invariant 6).
    """
    if row is None:
        return None
    if any(row[k] != owner[k] for k in ("project_id", "agent_id", "user_id")):
        return None
    label = row["label"] or row["description"] or row["item_type"]
    return InventoryItem(label=label, properties=parse_json_object(row["properties_json"]))


def schedule_draft(
    schedule: Mapping[str, Any], source_id: str, fire_at: datetime, item: InventoryItem | None
) -> Draft:
    """The draft of one schedule fire (``source_id`` = the fire id)."""
    metadata = parse_json_object(schedule["metadata_json"])
    block = schedule_block(
        intent=schedule["intent"],
        check_type=schedule["check_type"],
        # seeds/001: "Scheduled fire time (user's local) — the next_fire_at_local value".
        fire_at_local=format_local(fire_at, ZoneInfo(schedule["timezone"])),
        item=item,
        metadata=metadata,
    )
    return Draft(
        source_id=source_id,
        project_id=schedule["project_id"],
        agent_id=schedule["agent_id"],
        user_id=schedule["user_id"],
        fire_at=fire_at,
        block=block,
        metadata=metadata,
        schedule_id=schedule["id"],
    )


def wakeup_draft(wakeup: Mapping[str, Any], item: InventoryItem | None) -> Draft:
    """The draft of a wakeup firing at its ``scheduled_at``."""
    block = wakeup_block(
        intent=wakeup["intent"],
        check_type=wakeup["check_type"],
        fire_at=wakeup["scheduled_at"],
        occasion=wakeup["occasion"],
        interest_topic=wakeup["interest_topic"],
        event_description=wakeup["event_description"],
        item=item,
    )
    return Draft(
        source_id=wakeup["id"],
        project_id=wakeup["project_id"],
        agent_id=wakeup["agent_id"],
        user_id=wakeup["user_id"],
        fire_at=wakeup["scheduled_at"],
        block=block,
        metadata={},
        wakeup_id=wakeup["id"],
    )


def event_draft(event: Mapping[str, Any]) -> Draft:
    """The draft of the reaction to an accepted trigger event."""
    metadata = parse_json_object(event["metadata_json"])
    block = event_block(
        event_type=event["event_type"],
        event_description=event["event_description"],
        occurred_at=event["created_at"],
        metadata=metadata,
        language=event["language"],
        messages=_json_list(event["messages_json"]),
    )
    return Draft(
        source_id=event["id"],
        project_id=event["project_id"],
        agent_id=event["agent_id"],
        user_id=event["user_id"],
        fire_at=event["created_at"],
        block=block,
        metadata=metadata,
        trigger_event_id=event["id"],
    )


def notification_row(
    draft: Draft,
    *,
    message: str,
    error: str | None,
    created_at: datetime,
    staged: bool = False,
) -> dict[str, Any]:
    """
    The ``notifications`` row for a composed draft, payload included (DESIGN decision 3).

    ``error`` set means the composer failed: the row is kept with status
    ``failed_generation`` and an empty message, never dropped. ``staged``: the
    fire is still ahead (:mod:`delivery.store.staging`); the row stays hidden until
    promoted, and becomes ``pending`` or ``failed_generation`` then.
    """
    nid = draft.notification_id
    event_type = EVENT_TYPES[draft.block.kind]
    payload: dict[str, Any] = {
        "event_id": nid,
        "event_type": event_type,
        "created_at": format_utc(created_at),
        "project_id": draft.project_id,
        "agent_id": draft.agent_id,
        "user_id": draft.user_id,
        "message_id": nid,
        "source_type": draft.block.kind.value,
        "check_type": draft.block.check_type,
        "intent": draft.block.intent,
        "generated_message": message,
        "fire_at": format_utc(draft.fire_at),
        "fire_at_local": draft.block.fire_at_local,
        "metadata": dict(draft.metadata),
    }
    for key in ("schedule_id", "wakeup_id", "trigger_event_id"):
        value = getattr(draft, key)
        if value is not None:
            payload[key] = value
    return {
        "id": nid,
        "project_id": draft.project_id,
        "agent_id": draft.agent_id,
        "user_id": draft.user_id,
        "source_type": draft.block.kind.value,
        "source_id": draft.source_id,
        "schedule_id": draft.schedule_id,
        "wakeup_id": draft.wakeup_id,
        "trigger_event_id": draft.trigger_event_id,
        "event_type": event_type,
        "check_type": draft.block.check_type,
        "intent": draft.block.intent,
        "generated_message": message,
        "status": STAGED if staged else ("failed_generation" if error is not None else "pending"),
        "error": error,
        "fire_at": draft.fire_at,
        "payload_json": json.dumps(payload, sort_keys=True, separators=(",", ":")),
        "ack_status": "pending",
        "acknowledged_at": None,
        "created_at": created_at,
        "consumed_at": None,
    }


def outbox_row(row: Mapping[str, Any], subjects: Subjects, now: datetime) -> dict[str, Any]:
    """
    The ``notification.created`` outbox entry of a notification row (msg id = its id).

    A staged row's entry waits for its fire instant, when the relay promotes
    the row just before publishing (:func:`delivery.store.staging.promote`).
    """
    message = NotificationCreated(
        notification_id=row["id"],
        project_id=row["project_id"],
        agent_id=row["agent_id"],
        user_id=row["user_id"],
        event_type=row["event_type"],
    )
    return {
        "subject": subjects.notification_created,
        "msg_id": row["id"],
        "payload": message.model_dump_json(),
        "created_at": now,
        "available_at": row["fire_at"] if row["status"] == STAGED else now,
    }


async def compose_all(
    composer: Composer, drafts: Sequence[Draft]
) -> list[tuple[Draft, str, str | None]]:
    """
    Compose every draft, at most :data:`COMPOSE_CONCURRENCY` at a time, keeping order.

    Returns:
        ``(draft, message, error)`` per draft; ``error`` is set (and the
        message empty) when the composer raised :class:`CompositionError`.
    """

    async def one(draft: Draft) -> tuple[Draft, str, str | None]:
        try:
            return draft, await composer.compose(draft.block), None
        except CompositionError as exc:
            log.warning(
                "notification.generation_failed",
                notification_id=draft.notification_id,
                source_id=draft.source_id,
                error=str(exc),
            )
            return draft, "", str(exc) or type(exc).__name__

    if not getattr(composer, "io_bound", True):
        # A composer that never waits gains nothing from tasks; 500 of them per
        # batch only queued 500 more callbacks on a loop the whole burst shares.
        return [await one(d) for d in drafts]
    gate = asyncio.Semaphore(COMPOSE_CONCURRENCY)

    async def gated(draft: Draft) -> tuple[Draft, str, str | None]:
        async with gate:
            return await one(draft)

    return list(await asyncio.gather(*(gated(d) for d in drafts)))


async def _rows_by_id(
    conn: AsyncConnection, table: Table, ids: Iterable[str]
) -> dict[str, Mapping[str, Any]]:
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    result = await conn.execute(select(table).where(table.c.id.in_(wanted)))
    return {row["id"]: dict(row) for row in result.mappings()}


async def existing_sources(conn: AsyncConnection, source_ids: Iterable[str]) -> set[str]:
    """The subset of ``source_ids`` that already has a notification."""
    return _done([], await _existing(conn, source_ids))


async def _existing(conn: AsyncConnection, source_ids: Iterable[str]) -> list[Mapping[str, Any]]:
    wanted = sorted(set(source_ids))
    if not wanted:
        return []
    n = NOTIFICATIONS.c
    result = await conn.execute(select(n.source_id, n.status).where(n.source_id.in_(wanted)))
    return [dict(row) for row in result.mappings()]


def _done(refs: Iterable[SourceRef], existing: Iterable[Mapping[str, Any]]) -> set[str]:
    """Sources whose notification is made: all that have one, but a restaged one's staged row."""
    replaceable = {r.id for r in refs if r.replace_staged}
    return {
        row["source_id"]
        for row in existing
        if not (row["status"] == STAGED and row["source_id"] in replaceable)
    }


@dataclass(slots=True)
class _Loaded:
    """The rows behind a batch of refs, by id (what :func:`build_drafts` reads)."""

    done: set[str]
    fires: dict[str, Mapping[str, Any]]
    wakeups: dict[str, Mapping[str, Any]]
    events: dict[str, Mapping[str, Any]]
    schedules: dict[str, Mapping[str, Any]]
    items: dict[str, Mapping[str, Any]]


def _split(refs: Sequence[SourceRef], done: set[str]) -> tuple[list[SourceRef], list[str]]:
    """The refs still to do, and the duplicates: done already, or twice in the batch."""
    todo: list[SourceRef] = []
    duplicates: list[str] = []
    seen: set[SourceRef] = set()
    for ref in refs:
        # A batch may carry the same source twice (an outbox replay next to the original).
        if ref.id in done or ref in seen:
            duplicates.append(ref.id)
        else:
            todo.append(ref)
        seen.add(ref)
    return todo, duplicates


def _ids(refs: Iterable[SourceRef], kind: SourceKind) -> list[str]:
    return [r.id for r in refs if r.kind is kind]


def _item_ids(
    loaded_schedules: Iterable[Mapping[str, Any]], wakeups: Iterable[Mapping[str, Any]]
) -> list[str]:
    ids = [s["inventory_item_id"] for s in loaded_schedules if s["inventory_item_id"]]
    return ids + [w["inventory_item_id"] for w in wakeups if w["inventory_item_id"]]


async def _load(conn: AsyncConnection, refs: Sequence[SourceRef]) -> _Loaded:
    done = _done(refs, await _existing(conn, (r.id for r in refs)))
    todo, _ = _split(refs, done)
    fires = await _rows_by_id(conn, FIRES, _ids(todo, SourceKind.SCHEDULE))
    wakeups = await _rows_by_id(conn, WAKEUPS, _ids(todo, SourceKind.WAKEUP))
    events = await _rows_by_id(conn, EVENTS, _ids(todo, SourceKind.EVENT))
    schedules = await _rows_by_id(conn, SCHEDULES, (f["schedule_id"] for f in fires.values()))
    items = await _rows_by_id(conn, ITEMS, _item_ids(schedules.values(), wakeups.values()))
    return _Loaded(done, fires, wakeups, events, schedules, items)


_FIRE_COLUMNS = ("id", "schedule_id", "status", "fire_at")
_SCHEDULE_COLUMNS = (
    "id",
    "project_id",
    "agent_id",
    "user_id",
    "timezone",
    "intent",
    "check_type",
    "inventory_item_id",
    "metadata_json",
)
"""What :func:`build_drafts` reads of fire and schedule rows (a burst reads thousands)."""


def _load_sqlite(db: sqlite3.Connection, refs: Sequence[SourceRef]) -> _Loaded:
    """:func:`_load` in one go on SQLite's driver thread (see :mod:`delivery.store.direct`)."""

    def by_id(
        table: Table, ids: Iterable[str], columns: Sequence[str] | None = None
    ) -> dict[str, Mapping[str, Any]]:
        return {row["id"]: row for row in direct.select_in(db, table, "id", ids, columns=columns)}

    done = _done(
        refs,
        direct.select_in(
            db, NOTIFICATIONS, "source_id", (r.id for r in refs), columns=["source_id", "status"]
        ),
    )
    todo, _ = _split(refs, done)
    fires = by_id(FIRES, _ids(todo, SourceKind.SCHEDULE), _FIRE_COLUMNS)
    wakeups = by_id(WAKEUPS, _ids(todo, SourceKind.WAKEUP))
    events = by_id(EVENTS, _ids(todo, SourceKind.EVENT))
    schedules = by_id(SCHEDULES, (f["schedule_id"] for f in fires.values()), _SCHEDULE_COLUMNS)
    items = by_id(ITEMS, _item_ids(schedules.values(), wakeups.values()))
    return _Loaded(done, fires, wakeups, events, schedules, items)


def build_drafts(refs: Sequence[SourceRef], loaded: _Loaded, result: BatchResult) -> list[Draft]:
    """
    The drafts of ``refs`` from their ``loaded`` rows; record what is skipped.

    Skipped (recorded in ``result``, never retried): a source that already has
    its notification (a redelivery), a fire row that is missing or was
    recorded as skipped, a fire whose schedule was deleted, a wakeup that is
    missing or no longer pending (a cancelled wakeup produces nothing), a
    missing trigger event.
    """
    todo, duplicates = _split(refs, loaded.done)
    result.duplicates.extend(duplicates)
    fires, wakeups, events = loaded.fires, loaded.wakeups, loaded.events
    schedules, items = loaded.schedules, loaded.items

    drafts: list[Draft] = []
    for ref in todo:
        if ref.kind is SourceKind.SCHEDULE:
            fire = fires.get(ref.id)
            if fire is None or fire["status"] != "fired":
                result.skipped[ref.id] = "fire missing" if fire is None else "fire skipped"
                continue
            schedule = schedules.get(fire["schedule_id"])
            if schedule is None:
                result.skipped[ref.id] = "schedule deleted"
                continue
            item_row = items.get(schedule["inventory_item_id"] or "")
            drafts.append(
                schedule_draft(
                    schedule, ref.id, fire["fire_at"], inventory_item(item_row, schedule)
                )
            )
        elif ref.kind is SourceKind.WAKEUP:
            wakeup = wakeups.get(ref.id)
            if wakeup is None or wakeup["status"] != "pending":
                result.skipped[ref.id] = (
                    "wakeup missing" if wakeup is None else (f"wakeup {wakeup['status']}")
                )
                continue
            item_row = items.get(wakeup["inventory_item_id"] or "")
            drafts.append(wakeup_draft(wakeup, inventory_item(item_row, wakeup)))
        else:
            event = events.get(ref.id)
            if event is None:
                result.skipped[ref.id] = "event missing"
                continue
            drafts.append(event_draft(event))
    return drafts


async def write_notifications(
    conn: AsyncConnection,
    composed: Sequence[tuple[Draft, str, str | None]],
    *,
    subjects: Subjects,
    now: datetime,
    simulated: bool = False,
    replace: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """
    Inside the caller's transaction: transition sources and insert notifications + outbox.

    A wakeup is executed only if it is still ``pending`` at write time (the
    ``UPDATE ... WHERE status = 'pending' RETURNING id`` takes the row lock on
    PostgreSQL and runs alone on SQLite), so a cancel racing the dispatcher
    either wins (no notification) or answers 409. Failed generations are kept
    but not published: there is no text to deliver.

    Args:
        now: stamps outbox rows, and notification ``created_at`` / wakeup
            ``executed_at`` unless ``simulated``.
        simulated: advance-time: each notification is created, and each
            wakeup executed, at its own simulated fire instant (DESIGN decision 9).
        replace: source ids whose ``staged`` notification (and its unsent
            outbox entry) is deleted first: restaged fires, and advance-time's
            fires that the scheduler had staged (:mod:`delivery.store.staging`).

    Returns:
        The notification rows written (a concurrent duplicate collides
        harmlessly on ``source_id``) and source id -> skip reason for wakeups
        lost to a race.
    """
    skipped: dict[str, str] = {}
    await drop_staged(conn, replace)
    wakeups = [d for d, _, _ in composed if d.block.kind is SourceKind.WAKEUP]
    executed: set[str] = set()
    if simulated:
        # Each wakeup executes at its own simulated instant: one statement each.
        for draft in wakeups:
            stmt = (
                update(WAKEUPS)
                .where(WAKEUPS.c.id == draft.source_id, WAKEUPS.c.status == "pending")
                .values(status="executed", executed_at=draft.fire_at)
                .returning(WAKEUPS.c.id)
            )
            executed.update((await conn.execute(stmt)).scalars())
    elif wakeups:
        stmt = (
            update(WAKEUPS)
            .where(
                WAKEUPS.c.id.in_(sorted({d.source_id for d in wakeups})),
                WAKEUPS.c.status == "pending",
            )
            .values(status="executed", executed_at=now)
            .returning(WAKEUPS.c.id)
        )
        executed.update((await conn.execute(stmt)).scalars())
    skipped.update(_lost_wakeups(wakeups, executed))
    event_ids = _event_ids(composed)
    if event_ids:
        await conn.execute(
            update(EVENTS)
            .where(EVENTS.c.id.in_(event_ids), EVENTS.c.status == "accepted")
            .values(status="dispatched")
        )
    rows = _notification_rows(composed, skipped, now=now, simulated=simulated)
    await bulk.insert_notifications(conn, rows)
    await bulk.insert_outbox(conn, _outbox_rows(rows, subjects, now))
    return rows, skipped


def _lost_wakeups(wakeups: Iterable[Draft], executed: set[str]) -> dict[str, str]:
    return {d.source_id: "wakeup no longer pending" for d in wakeups if d.source_id not in executed}


def _event_ids(composed: Iterable[tuple[Draft, str, str | None]]) -> list[str]:
    return sorted({d.source_id for d, _, _ in composed if d.block.kind is SourceKind.EVENT})


def _staged(draft: Draft, now: datetime, simulated: bool) -> bool:
    # Only the scheduler's lookahead makes a fire that is still ahead of the
    # dispatcher's clock; advance-time's simulated fires are final when written.
    return not simulated and draft.block.kind is SourceKind.SCHEDULE and draft.fire_at > now


def _notification_rows(
    composed: Iterable[tuple[Draft, str, str | None]],
    skipped: Mapping[str, str],
    *,
    now: datetime,
    simulated: bool,
) -> list[dict[str, Any]]:
    rows = []
    for d, m, e in composed:
        if d.source_id in skipped:
            continue
        staged = _staged(d, now, simulated)
        # A staged row's created_at is a placeholder (promotion sets the real
        # instant); its payload says the fire instant, when it became due.
        created_at = d.fire_at if simulated or staged else now
        rows.append(notification_row(d, message=m, error=e, created_at=created_at, staged=staged))
    return rows


def _outbox_rows(
    rows: Iterable[Mapping[str, Any]], subjects: Subjects, now: datetime
) -> list[dict[str, Any]]:
    # Failed generations are kept but not published: there is no text to deliver.
    return [
        outbox_row(r, subjects, now)
        for r in rows
        if r["status"] == "pending" or (r["status"] == STAGED and r["error"] is None)
    ]


def write_notifications_sqlite(
    db: sqlite3.Connection,
    composed: Sequence[tuple[Draft, str, str | None]],
    *,
    subjects: Subjects,
    now: datetime,
    replace: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """
    :func:`write_notifications` (not simulated) on SQLite's driver thread, inside
    the caller's :func:`delivery.store.direct.write` transaction: the same rows.
    """
    if replace:
        ids = sorted({notification_id(source_id) for source_id in replace})
        direct.delete_in(db, NOTIFICATIONS, "id", ids, only_if={"status": STAGED})
        direct.delete_in(db, OUTBOX, "msg_id", ids, only_if={"sent_at": None})
    wakeups = [d for d, _, _ in composed if d.block.kind is SourceKind.WAKEUP]
    executed: set[str] = set()
    if wakeups:
        executed.update(
            direct.update_in(
                db,
                WAKEUPS,
                "id",
                sorted({d.source_id for d in wakeups}),
                {"status": "executed", "executed_at": now},
                only_if={"status": "pending"},
            )
        )
    skipped = _lost_wakeups(wakeups, executed)
    event_ids = _event_ids(composed)
    if event_ids:
        direct.update_in(
            db, EVENTS, "id", event_ids, {"status": "dispatched"}, only_if={"status": "accepted"}
        )
    rows = _notification_rows(composed, skipped, now=now, simulated=False)
    direct.insert_ignoring_duplicates(db, NOTIFICATIONS, rows, unique="source_id")
    outbox = _outbox_rows(rows, subjects, now)
    direct.insert_ignoring_duplicates(db, OUTBOX, outbox, unique="msg_id")
    return rows, skipped


class Processor:
    """
    Turns batches of source refs into notifications; the dispatcher's whole job.

    Args:
        engine: the store's engine.
        composer: message composer (template or LLM).
        subjects: subjects for the ``notification.created`` outbox rows.
        clock: stamps ``created_at`` / ``executed_at``.
    """

    def __init__(
        self, engine: AsyncEngine, composer: Composer, subjects: Subjects, clock: Clock
    ) -> None:
        self.engine = engine
        self.composer = composer
        self.subjects = subjects
        self.clock = clock
        self._sqlite = is_sqlite(str(engine.url))

    async def process(self, refs: Sequence[SourceRef]) -> BatchResult:
        """
        Make the notification of every ref that does not have one yet.

        Idempotent: a ref whose notification exists is reported as a duplicate
        and changes nothing. Database errors propagate (the caller nacks and
        JetStream redelivers); composer failures do not (``failed_generation``).
        """
        result = BatchResult()
        if self._sqlite:
            loaded = await direct.read(self.engine, partial(_load_sqlite, refs=refs))
        else:
            async with self.engine.connect() as conn:
                loaded = await _load(conn, refs)
        drafts = build_drafts(refs, loaded, result)
        # A restaged source's staged row goes even when nothing replaces it (its
        # fire or schedule was deleted): it was composed from a state now gone.
        replace = sorted({r.id for r in refs if r.replace_staged})
        for source_id, reason in result.skipped.items():
            log.info("dispatch.skipped", source_id=source_id, reason=reason)
        for source_id in result.duplicates:
            log.info(
                "dispatch.duplicate",
                source_id=source_id,
                notification_id=notification_id(source_id),
            )
        if not drafts and not replace:
            return result
        composed = await compose_all(self.composer, drafts)
        now = self.clock.now()
        if self._sqlite:
            rows, lost = await direct.write(
                self.engine,
                partial(
                    write_notifications_sqlite,
                    composed=composed,
                    subjects=self.subjects,
                    now=now,
                    replace=replace,
                ),
            )
        else:
            async with write_transaction(self.engine) as conn:
                rows, lost = await write_notifications(
                    conn, composed, subjects=self.subjects, now=now, replace=replace
                )
        result.skipped.update(lost)
        for source_id, reason in lost.items():
            log.info("dispatch.skipped", source_id=source_id, reason=reason)
        for row in rows:
            result.created.append(row["id"])
            if row["status"] == "failed_generation":
                result.failed.append(row["id"])
            log.info(
                "notification.created",
                notification_id=row["id"],
                source_id=row["source_id"],
                source_type=row["source_type"],
                status=row["status"],
            )
        return result
