"""
The dispatcher's core: a batch of fire / wakeup / event ids -> exactly one notification each.

Read the rows through the store, build the intent blocks, compose (outside
any transaction, so a slow LLM never holds a lock), build the rows to write
(pure), then have the store write them in ONE transaction: move wakeups
pending -> executed, mark trigger events dispatched, insert the notifications
(unique on ``source_id``) and queue one ``notification.created`` outbox row per
new notification, in one transaction. Running a batch twice, or two
dispatchers running it at once, leaves the same rows as running it once. No
SQL here: :mod:`delivery.store.notifications` holds it.
"""

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog
from opentelemetry.trace import SpanKind, use_span
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery import tracing
from delivery.bus.messages import NotificationCreated
from delivery.bus.subjects import Subjects
from delivery.cadence import Window, compile_window
from delivery.cadence.instants import format_local, format_utc
from delivery.clock import Clock
from delivery.dispatcher.compose import event_block, schedule_block, wakeup_block
from delivery.dispatcher.composers import Composer, CompositionError
from delivery.dispatcher.messages import Messages, as_composed
from delivery.dispatcher.policies import Policies
from delivery.domain import (
    EVENT_TYPES,
    Draft,
    InventoryItem,
    SourceKind,
    SourceRef,
    notification_id,
    payload_json,
)
from delivery.metrics import COMPOSER_DURATION, COMPOSER_FAILURES
from delivery.policy import (
    DEFAULT_POLICY,
    DEFAULT_SOURCE,
    KEEP,
    Outcome,
    Priority,
    ProjectPolicy,
    QuietHours,
    SourcePolicy,
    decide,
    source_policy,
)
from delivery.store.engine import Engine
from delivery.store.notifications import (
    NotificationBatch,
    NotificationStore,
    Sources,
    notification_store,
)
from delivery.store.policy import PolicyStore, UserOf
from delivery.store.staging import STAGED
from delivery.templates import Composed
from delivery.tracing import Carrier, request_id_of, stored

log = structlog.get_logger(__name__)

COMPOSE_CONCURRENCY = 32
"""Composer calls in flight per batch (bounds LLM fan-out; free for the template)."""
LOST_WAKEUP = "wakeup no longer pending"
POLICY_CACHE_S = 5.0
"""How long a project's delivery policy is reused when the caller gives no cache."""
FALLBACKS = frozenset({Composed.TEMPLATE_FALLBACK.value, Composed.DEFAULT_FALLBACK.value})
"""The ``composer`` values that say a fallback wrote the message."""
"""Why a wakeup cancelled between the read and the write produced nothing."""


@dataclass(slots=True)
class BatchResult:
    """
    What one batch did (a bounded run returns what it did).

    Attributes:
        created: ids of notifications this batch inserted (pending or failed_generation).
        failed: the subset of ``created`` kept as ``failed_generation``.
        duplicates: source ids that already had their notification (redeliveries).
        skipped: source id -> why nothing was made (cancelled wakeup, missing row, ...).
        fallbacks: the subset of ``created`` whose message a fallback wrote (the LLM
            or the project's template failed).
        policy: notification id -> ``status/reason`` for those a delivery policy
            decided (suppressed, deferred, expired, superseded).
    """

    created: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    policy: dict[str, str] = field(default_factory=dict)


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
    tenant's or user's item.
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
    policy = source_policy(schedule.get("policy_json"))
    block = schedule_block(
        intent=schedule["intent"],
        check_type=schedule["check_type"],
        # The Sonzai docs: "Scheduled fire time (user's local) — the next_fire_at_local value".
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
        policy=policy,
        next_fire_at=schedule.get("next_fire_at"),
        window=_deferring_window(schedule, policy),
    )


def _deferring_window(schedule: Mapping[str, Any], policy: SourcePolicy) -> Window | None:
    """The active window of a schedule that defers what falls outside it, else ``None``."""
    text = schedule.get("active_window_json")
    if policy.outside_window != "defer" or not text:
        return None
    return compile_window(json.loads(text), schedule["timezone"])


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
        policy=source_policy(wakeup.get("policy_json")),
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
        policy=source_policy(event.get("policy_json")),
    )


def notification_row(
    draft: Draft,
    *,
    message: str,
    error: str | None,
    created_at: datetime,
    staged: bool = False,
    composer: str | None = None,
    outcome: Outcome = KEEP,
    offset: timedelta = timedelta(0),
) -> dict[str, Any]:
    """
    The ``notifications`` row for a composed draft, payload included (the webhook body).

    ``error`` set means the composer failed: the row is kept with status
    ``failed_generation`` and an empty message, never dropped. ``staged``: the
    fire is still ahead (:mod:`delivery.store.staging`); the row stays hidden until
    promoted, and becomes ``pending`` or ``failed_generation`` then. ``composer``
    says how the message was made (:class:`delivery.templates.Composed`); it is
    stored, not sent. ``outcome``: what the delivery policy decided
    (:func:`delivery.policy.decide`): a status and its reason, a deferred instant
    (the row is staged until then), the deadline.

    ``offset``: the clock offset of the draft's advanced pair. The outcome's
    instants are on the pair's clock; the two that real time acts on are stored in
    real time, as a schedule's ``due_at`` is: the deadline (``expires_at``, which
    the expiry sweep, the queue, consume and every sender compare with real now)
    and a deferred row's ``fire_at`` (when the relay releases it and its outbox
    entry becomes available). Its ``created_at`` stays the pair's instant, which
    promotion keeps (:func:`delivery.store.staging.promote`). An advance moves
    them with the offset (:mod:`delivery.store.advance`).
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
    status = STAGED if staged else ("failed_generation" if error is not None else "pending")
    if outcome.due_at is not None:
        status = STAGED
    if outcome.status is not None and error is None:
        status = outcome.status
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
        "status": status,
        "error": error,
        "composer": composer,
        # A deferred row waits for its new instant as a staged one waits for its fire.
        "fire_at": draft.fire_at if outcome.due_at is None else outcome.due_at - offset,
        "payload_json": payload_json(payload),
        "ack_status": "pending",
        "acknowledged_at": None,
        "created_at": created_at if outcome.due_at is None else outcome.due_at,
        "consumed_at": None,
        "priority": None if draft.policy.priority == Priority.NORMAL else draft.policy.priority,
        "expires_at": None if outcome.expires_at is None else outcome.expires_at - offset,
        "supersede_key": draft.policy.supersede_key,
        "status_reason": outcome.reason,
    }


def outbox_row(
    row: Mapping[str, Any],
    subjects: Subjects,
    now: datetime,
    carriers: Mapping[str, Carrier] | None = None,
) -> dict[str, Any]:
    """
    The ``notification.created`` outbox entry of a notification row (msg id = its id).

    A staged row's entry waits for its fire instant, when the relay promotes
    the row just before publishing (:func:`delivery.store.staging.promote`).
    ``carriers``: source id -> the request id and trace context its message
    carried, stored to be passed on to the handlers (:mod:`delivery.tracing`).
    """
    message = NotificationCreated(
        notification_id=row["id"],
        project_id=row["project_id"],
        agent_id=row["agent_id"],
        user_id=row["user_id"],
        event_type=row["event_type"],
    )
    entry = {
        "subject": subjects.notification_created,
        "msg_id": row["id"],
        "payload": message.model_dump_json(),
        "created_at": now,
        "available_at": row["fire_at"] if row["status"] == STAGED else now,
    }
    if carriers is not None:
        # Every entry of a batch has the same keys (one executemany).
        entry["headers"] = stored(carriers.get(row["source_id"]))
    return entry


async def compose_all(
    composer: Composer,
    drafts: Sequence[Draft],
    carriers: dict[str, Carrier] | None = None,
) -> list[tuple[Draft, str, str | None]]:
    """
    Compose every draft, at most :data:`COMPOSE_CONCURRENCY` at a time, keeping order.

    Args:
        carriers: source id -> the request id and trace its message carried; with
            tracing on, each such composition is a span of that trace, and the
            carrier is updated to name it (what the handlers continue).

    Returns:
        ``(draft, message, error)`` per draft; ``error`` is set (and the
        message empty) when the composer raised :class:`CompositionError`.
    """
    name = type(composer).__name__.removesuffix("Composer").lower() or "composer"
    io_bound = getattr(composer, "io_bound", True)
    failures = 0

    async def one(draft: Draft) -> tuple[Draft, str, str | None]:
        nonlocal failures
        started = time.perf_counter() if io_bound else 0.0
        try:
            return draft, await composer.compose(draft.block), None
        except CompositionError as exc:
            failures += 1
            log.warning(
                "notification.generation_failed",
                notification_id=draft.notification_id,
                source_id=draft.source_id,
                error=str(exc),
            )
            return draft, "", str(exc) or type(exc).__name__
        finally:
            if io_bound:
                COMPOSER_DURATION.labels(name).observe(time.perf_counter() - started)

    async def traced(draft: Draft) -> tuple[Draft, str, str | None]:
        found = carriers.get(draft.source_id) if carriers else None
        if found is None or not tracing.enabled():
            return await one(draft)
        with tracing.span(
            "dispatch compose",
            found,
            kind=SpanKind.CONSUMER,
            attributes={"messaging.message.id": draft.notification_id},
        ):
            composed = await one(draft)
            assert carriers is not None  # noqa: S101 - found came from it
            carriers[draft.source_id] = tracing.child_carrier(found) or found
        return composed

    started = time.perf_counter()
    if not io_bound:
        # A composer that never waits gains nothing from tasks; 500 of them per
        # batch only queued 500 more callbacks on a loop the whole burst shares.
        # Timed once per batch: a clock read per message would cost as much as it.
        results = [await traced(d) for d in drafts]
        if drafts:
            COMPOSER_DURATION.labels(name).observe((time.perf_counter() - started) / len(drafts))
    else:
        gate = asyncio.Semaphore(COMPOSE_CONCURRENCY)

        async def gated(draft: Draft) -> tuple[Draft, str, str | None]:
            async with gate:
                return await traced(draft)

        results = list(await asyncio.gather(*(gated(d) for d in drafts)))
    if failures:
        COMPOSER_FAILURES.labels(name).inc(failures)
    return results


@contextlib.contextmanager
def compose_spans(drafts: Sequence[Draft], carriers: dict[str, Carrier] | None) -> Iterator[None]:
    """
    With tracing on, a ``dispatch compose`` span per draft whose message carried a
    trace, open while the batch is composed; each carrier then names its span.
    """
    if not carriers or not tracing.enabled():
        yield
        return
    spans = []
    for draft in drafts:
        found = carriers.get(draft.source_id)
        if found is None:
            continue
        span = tracing.start_span(
            "dispatch compose",
            found,
            kind=SpanKind.CONSUMER,
            attributes={"messaging.message.id": draft.notification_id},
        )
        with use_span(span, end_on_exit=False):
            carriers[draft.source_id] = tracing.child_carrier(found) or found
        spans.append(span)
    try:
        yield
    finally:
        for span in spans:
            span.end()


def _count_messages(composers: Mapping[str, str], seconds: float) -> None:
    """The message step's timing (the batch's mean per message, per composer) and fallbacks."""
    if not composers:
        return
    made: dict[str, int] = {}
    for how in composers.values():
        made[how] = made.get(how, 0) + 1
    mean = seconds / len(composers)
    for how in made:
        COMPOSER_DURATION.labels(how).observe(mean)
    # A fallback is the failure of the composer it stood in for.
    if made.get(Composed.TEMPLATE_FALLBACK):
        COMPOSER_FAILURES.labels(Composed.LLM.value).inc(made[Composed.TEMPLATE_FALLBACK])
    if made.get(Composed.DEFAULT_FALLBACK):
        COMPOSER_FAILURES.labels(Composed.TEMPLATE.value).inc(made[Composed.DEFAULT_FALLBACK])


def build_drafts(sources: Sources, result: BatchResult) -> list[Draft]:
    """
    The drafts of the refs still to do, from their ``sources`` rows; record what is skipped.

    Skipped (recorded in ``result``, never retried): a source that already has
    its notification (a redelivery), a fire row that is missing or was
    recorded as skipped, a fire whose schedule was deleted, a wakeup that is
    missing or no longer pending (a cancelled wakeup produces nothing), a
    missing trigger event.
    """
    result.duplicates.extend(sources.duplicates)
    fires, wakeups, events = sources.fires, sources.wakeups, sources.events
    schedules, items = sources.schedules, sources.items

    drafts: list[Draft] = []
    for ref in sources.todo:
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


def _staged(draft: Draft, now: datetime, simulated: bool) -> bool:
    # Only the scheduler's lookahead makes a fire that is still ahead of the
    # dispatcher's clock; advance-time's simulated fires are final when written.
    return not simulated and draft.block.kind is SourceKind.SCHEDULE and draft.fire_at > now


def notification_batch(
    composed: Iterable[tuple[Draft, str, str | None]],
    *,
    subjects: Subjects,
    now: datetime,
    simulated: bool = False,
    replace: Sequence[str] = (),
    composers: Mapping[str, str] | None = None,
    carriers: Mapping[str, Carrier] | None = None,
    offsets: Mapping[str, float] | None = None,
    policies: Mapping[str, ProjectPolicy] | None = None,
    quiet: Mapping[UserOf, QuietHours] | None = None,
) -> NotificationBatch:
    """
    What the store writes for ``composed`` (pure): the notification rows, their
    outbox entries, the wakeups to execute and the trigger events to mark dispatched.

    Failed generations are kept but not published: there is no text to deliver.

    Args:
        now: stamps outbox rows, and notification ``created_at`` / wakeup
            ``executed_at`` unless ``simulated``.
        simulated: advance-time: each notification is created, and each
            wakeup executed, at its own simulated fire instant.
        replace: source ids whose ``staged`` notification (and its unsent
            outbox entry) is deleted first: restaged fires, and advance-time's
            fires that the scheduler had staged (:mod:`delivery.store.staging`).
        composers: source id -> how its message was made (the ``composer`` column).
        carriers: source id -> request id and trace to pass on in the outbox entry.
        offsets: source id -> its pair's clock offset in seconds: such a
            notification is created, and its wakeup executed, at the pair's now
            (``simulated``: at its own instant, already on the pair's clock), so a
            pair's history reads in its own clock's order; its deadline and
            deferral are stored in real time (:func:`notification_row`) and its
            budget counted on the pair's clock
            (:func:`delivery.store.notifications.budgeting`).
        policies: project id -> its delivery policy (absent: the default, every rule
            off); the attention budgets go to the store, decided in its transaction.
        quiet: (project id, user id) -> the user's quiet hours, for those who have them.
    """
    rows: list[dict[str, Any]] = []
    wakeups: dict[str, datetime] = {}
    events: list[str] = []
    for d, m, e in composed:
        shift = (offsets or {}).get(d.source_id)
        offset = timedelta(seconds=shift or 0.0)
        pair_now = now + offset
        if d.block.kind is SourceKind.WAKEUP:
            wakeups[d.source_id] = d.fire_at if simulated else pair_now
        elif d.block.kind is SourceKind.EVENT:
            events.append(d.source_id)
        staged = _staged(d, pair_now, simulated)
        # A staged row's created_at is a placeholder (promotion sets the real
        # instant); its payload says the fire instant, when it became due.
        created_at = d.fire_at if simulated or staged else pair_now
        outcome = KEEP
        hours = quiet.get((d.project_id, d.user_id)) if quiet else None
        if hours is not None or d.policy is not DEFAULT_SOURCE or d.window is not None:
            outcome = decide(
                d.policy,
                (policies or {}).get(d.project_id, DEFAULT_POLICY),
                hours,
                due=created_at,
                fire_at=d.fire_at,
                next_fire_at=d.next_fire_at,
                window=d.window,
            )
        rows.append(
            notification_row(
                d,
                message=m,
                error=e,
                created_at=created_at,
                staged=staged,
                composer=(composers or {}).get(d.source_id),
                outcome=outcome,
                offset=offset,
            )
        )
    outbox = [
        outbox_row(r, subjects, now, carriers or None)
        for r in rows
        if r["status"] == "pending" or (r["status"] == STAGED and r["error"] is None)
    ]
    budgets = {
        p: policy.attention_budget
        for p, policy in (policies or {}).items()
        if policy.attention_budget is not None
    }
    shifted = {k: v for k, v in (offsets or {}).items() if v} if budgets else {}
    return NotificationBatch(rows, outbox, wakeups, events, replace, budgets, now, shifted)


class Processor:
    """
    Turns batches of source refs into notifications; the dispatcher's whole job.

    Args:
        store: the store, or the engine to build the SQL store over.
        composer: message composer (template or LLM), used as given when
            ``messages`` is ``None``: a failure is then kept as ``failed_generation``.
        subjects: subjects for the ``notification.created`` outbox rows.
        clock: stamps ``created_at`` / ``executed_at``.
        messages: the dispatcher's message step (project templates, LLM retries and
            the template fallback); when set, it composes instead of ``composer``.
        policies: the projects' delivery policies; by default read through the
            store's engine (when given one) and kept :data:`POLICY_CACHE_S`.
    """

    def __init__(
        self,
        store: NotificationStore | Engine,
        composer: Composer,
        subjects: Subjects,
        clock: Clock,
        *,
        messages: Messages | None = None,
        policies: Policies | None = None,
    ) -> None:
        self.store = notification_store(store)
        self.composer = composer
        self.subjects = subjects
        self.clock = clock
        self.messages = messages
        if policies is None and isinstance(store, AsyncEngine):
            policies = Policies(PolicyStore(store), ttl_s=POLICY_CACHE_S)
        self.policies = policies

    async def _rules(
        self, drafts: Sequence[Draft]
    ) -> tuple[dict[str, ProjectPolicy], dict[UserOf, QuietHours]]:
        """The batch's project policies that are on, and its users' quiet hours."""
        if self.policies is None:
            return {}, {}
        return await self.policies.of_drafts(drafts)

    async def process(
        self,
        refs: Sequence[SourceRef],
        carriers: dict[str, Carrier] | None = None,
        *,
        handed: bool = False,
    ) -> BatchResult:
        """
        Make the notification of every ref that does not have one yet.

        Idempotent: a ref whose notification exists is reported as a duplicate
        and changes nothing. Database errors propagate (the caller nacks and
        JetStream redelivers); composer failures do not (``failed_generation``).

        Args:
            carriers: source id -> the request id and trace context its message
                carried (most have none); passed on to the handlers.
            handed: the refs were handed off in-process (:mod:`delivery.handoff`),
                not consumed from JetStream: their held outbox entries (msg id =
                source id) are stamped sent in the transaction that writes the
                notifications, also when nothing is written (duplicates, skips).
        """
        result = BatchResult()
        sources = await self.store.load_sources(refs)
        drafts = build_drafts(sources, result)
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
        sent = [r.id for r in refs] if handed else []
        if not drafts and not replace:
            if sent:
                await self.store.write_notifications(
                    NotificationBatch((), (), now=self.clock.now(), sent=sent)
                )
            return result
        composers: Mapping[str, str] = {}
        if self.messages is not None:
            started = time.perf_counter()
            with compose_spans(drafts, carriers):
                composed, composers = as_composed(await self.messages.compose(drafts))
            _count_messages(composers, time.perf_counter() - started)
        else:
            composed = await compose_all(self.composer, drafts, carriers)
        policies, quiet = await self._rules(drafts)
        batch = notification_batch(
            composed,
            subjects=self.subjects,
            now=self.clock.now(),
            replace=replace,
            composers=composers,
            carriers=carriers,
            offsets={r.id: r.offset_s for r in refs if r.offset_s} | sources.event_offsets,
            policies=policies,
            quiet=quiet,
        )
        if sent:
            batch = dataclasses.replace(batch, sent=sent)
        written = await self.store.write_notifications(batch)
        for source_id in written.lost:
            result.skipped[source_id] = LOST_WAKEUP
            log.info("dispatch.skipped", source_id=source_id, reason=LOST_WAKEUP)
        for row in written.rows:
            result.created.append(row["id"])
            if row["status"] == "failed_generation":
                result.failed.append(row["id"])
            if row["composer"] in FALLBACKS:
                result.fallbacks.append(row["id"])
            if row.get("status_reason") is not None:
                result.policy[row["id"]] = f"{row['status']}/{row['status_reason']}"
            log.info(
                "notification.created",
                notification_id=row["id"],
                source_id=row["source_id"],
                source_type=row["source_type"],
                status=row["status"],
                **({"reason": row["status_reason"]} if row.get("status_reason") else {}),
                **(request_id_of(carriers.get(row["source_id"])) if carriers else {}),
            )
        return result
