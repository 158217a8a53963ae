"""
Notifications in the store: what the dispatcher reads and writes, and what the live stream reads.

The dispatcher reads what a batch of source refs needs (:meth:`NotificationStore.load_sources`),
composes outside any transaction, and writes the composed notifications with
their side effects in one transaction
(:meth:`NotificationStore.write_notifications`; advance-time writes its
notifications with the same operation, :func:`writing`, inside its own
transaction). Each operation is written once as :mod:`delivery.store.steps`:
on SQLite it runs whole on the driver's thread, on PostgreSQL as Core
statements, decided once per store.
"""

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from typing import Any, Final, Protocol

from sqlalchemy import ColumnElement, case, func, or_, select, tuple_, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.domain import SourceKind, SourceRef
from delivery.policy import (
    ATTENTION_BUDGET,
    EXPIRED,
    SUPERSEDED,
    SUPERSEDED_BY_KEY,
    SUPPRESSED,
    AttentionBudget,
    Candidate,
    Priority,
    allot,
    allot_rolling,
)
from delivery.store import direct
from delivery.store.common import StoreBase, owned, owned_values
from delivery.store.direct import sqlite_instant
from delivery.store.engine import read_on_loop
from delivery.store.policy import LIVE, PairOf, UserOf, pair_spent, spending, superseding
from delivery.store.staging import STAGED, dropping_staged
from delivery.store.steps import (
    InsertIgnoring,
    Runner,
    SelectIn,
    SelectWhere,
    Steps,
    UpdateIn,
    selecting,
)
from delivery.store.tables import (
    EVENTS,
    FIRES,
    NOTIFICATIONS,
    OFFSETS,
    OUTBOX,
    SCHEDULES,
    WAKEUPS,
)
from delivery.store.tables import INVENTORY as ITEMS

FIRE_COLUMNS: Final = ("id", "schedule_id", "status", "fire_at")
SCHEDULE_COLUMNS: Final = (
    "id",
    "project_id",
    "agent_id",
    "user_id",
    "timezone",
    "intent",
    "check_type",
    "inventory_item_id",
    "metadata_json",
    "policy_json",
    "next_fire_at",
    "active_window_json",
)
"""What a draft reads of fire and schedule rows (a burst reads thousands; converting
instants nobody reads was the largest cost of a batch's reads)."""

_n = NOTIFICATIONS.c
STREAM_COLUMNS: Final = (
    _n.id,
    _n.project_id,
    _n.agent_id,
    _n.user_id,
    _n.check_type,
    _n.generated_message,
    _n.status,
    _n.created_at,
    _n.consumed_at,
    _n.source_type,
    _n.wakeup_id,
    _n.intent,
    _n.expires_at,
)
"""What a queue entry shows of a notification (the stream's reads), and its deadline
(checked when the stream sends it, never shown)."""


def live_at(now: datetime) -> ColumnElement[bool]:
    """
    A message's deadline has not passed at ``now`` (none, or later): a pending message
    past it is expired, swept or not. The SQL form of
    :func:`delivery.policy.past_deadline`, for every read that hands out pending ones.
    """
    return or_(_n.expires_at.is_(None), _n.expires_at > now)


StoredRow = RowMapping
"""A notification row as the stream reads it (a read-only mapping of column names)."""

type UserKey = tuple[str, str, str]
"""(project_id, agent_id, user_id): whose notifications."""


@dataclass(slots=True)
class Sources:
    """
    What a batch of source refs needs: the refs still to do and their rows by id.

    Attributes:
        todo: the refs with no notification yet, each once, in batch order.
        duplicates: ids of the other refs (notification made already, or a
            repeat within the batch), in batch order.
        fires: the todo fires (:data:`FIRE_COLUMNS`).
        wakeups: the todo wakeups (every column).
        events: the todo trigger events (every column).
        schedules: the fires' schedules (:data:`SCHEDULE_COLUMNS`).
        items: the inventory items those schedules and wakeups name (every
            column; the caller checks they are the owner's).
    """

    todo: list[SourceRef]
    duplicates: list[str]
    fires: dict[str, Mapping[str, Any]]
    wakeups: dict[str, Mapping[str, Any]]
    events: dict[str, Mapping[str, Any]]
    schedules: dict[str, Mapping[str, Any]]
    items: dict[str, Mapping[str, Any]]
    event_offsets: dict[str, float]
    """Trigger event id -> its advanced pair's clock offset in seconds (others absent)."""


@dataclass(frozen=True, slots=True)
class NotificationBatch:
    """
    Everything one dispatch (or one advance) writes, as plain rows built by pure code.

    Attributes:
        notifications: ``notifications`` rows (``NotificationRow`` columns).
        outbox: their ``notification.created`` entries (``msg_id`` = notification id).
        wakeups: wakeup id -> ``executed_at``, for the wakeup notifications.
        events: ids of the trigger events whose notifications these are.
        replace: source ids whose ``staged`` notification is dropped first.
        budgets: project id -> its attention budget, for the projects that have one.
        now: the instant the budget's rolling window ends at.
        offsets: source id -> the clock offset (seconds) of its advanced pair: that
            message's budget is counted on the pair's clock (:func:`budgeting`).
        sent: msg ids of outbox entries this write delivers in place of the relay
            (fires handed off in-process, :mod:`delivery.handoff`): stamped sent at
            ``now`` in the same transaction, so they are published only if it never
            commits.
    """

    notifications: Sequence[Mapping[str, Any]]
    outbox: Sequence[Mapping[str, Any]]
    wakeups: Mapping[str, datetime] = field(default_factory=dict)
    events: Sequence[str] = ()
    replace: Sequence[str] = ()
    budgets: Mapping[str, AttentionBudget] = field(default_factory=dict)
    now: datetime | None = None
    offsets: Mapping[str, float] = field(default_factory=dict)
    sent: Sequence[str] = ()


@dataclass(frozen=True, slots=True)
class Written:
    """
    What :func:`writing` did.

    Attributes:
        rows: the notification rows written, in batch order (one that collided with
            a concurrent writer's on ``source_id`` is listed but not duplicated).
        lost: wakeups that were no longer pending: their rows were not written.
    """

    rows: list[Mapping[str, Any]]
    lost: list[str]


class NotificationStore(Protocol):
    """What the dispatcher relies on."""

    async def load_sources(self, refs: Sequence[SourceRef]) -> Sources:
        """
        The refs still to do and the rows they need, read outside any write transaction.

        A ref is done when its source has a notification, except a restage ref
        (``replace_staged``) whose source only has a ``staged`` one. Rows that
        are gone are simply absent.
        """
        ...

    async def write_notifications(self, batch: NotificationBatch) -> Written:
        """
        Write ``batch`` in ONE transaction, all of it or nothing; see :func:`writing`.

        Idempotent: notifications are unique on ``source_id`` and outbox
        entries on ``msg_id``, so writing a batch again (or two writers at once)
        leaves the rows of writing it once.
        """
        ...


class NotificationFeed(Protocol):
    """What the live stream relies on: reads of ``pending`` notifications only."""

    async def pending_by_id(self, ids: Sequence[str], now: datetime) -> dict[str, StoredRow]:
        """
        The ``pending`` notifications among ``ids`` (:data:`STREAM_COLUMNS`) not past
        their deadline at ``now``, by id.
        """
        ...

    async def pending_after(
        self, owner: UserKey, after_id: str | None, limit: int, now: datetime
    ) -> list[StoredRow]:
        """
        ``owner``'s first ``limit`` pending notifications not past their deadline at
        ``now``, in queue order (``created_at``, ``id``), after ``after_id`` when that
        is one of ``owner``'s notifications, from the start otherwise.
        """
        ...


def _ids(refs: Iterable[SourceRef], kind: SourceKind) -> list[str]:
    return [r.id for r in refs if r.kind is kind]


def _by_id(rows: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {row["id"]: row for row in rows}


def _done(refs: Iterable[SourceRef], existing: Iterable[Mapping[str, Any]]) -> set[str]:
    """Sources whose notification is made: all that have one, but a restaged one's staged row."""
    replaceable = {r.id for r in refs if r.replace_staged}
    return {
        row["source_id"]
        for row in existing
        if not (row["status"] == STAGED and row["source_id"] in replaceable)
    }


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


def loading(refs: Sequence[SourceRef]) -> Steps[Sources]:
    """:meth:`NotificationStore.load_sources` as steps."""
    existing = yield SelectIn(
        NOTIFICATIONS, "source_id", [r.id for r in refs], ("source_id", "status")
    )
    todo, duplicates = _split(refs, _done(refs, existing))
    fires = _by_id((yield SelectIn(FIRES, "id", _ids(todo, SourceKind.SCHEDULE), FIRE_COLUMNS)))
    wakeups = _by_id((yield SelectIn(WAKEUPS, "id", _ids(todo, SourceKind.WAKEUP))))
    events = _by_id((yield SelectIn(EVENTS, "id", _ids(todo, SourceKind.EVENT))))
    schedule_ids = [f["schedule_id"] for f in fires.values()]
    schedules = _by_id((yield SelectIn(SCHEDULES, "id", schedule_ids, SCHEDULE_COLUMNS)))
    item_ids = [
        row["inventory_item_id"]
        for row in [*schedules.values(), *wakeups.values()]
        if row["inventory_item_id"]
    ]
    items = _by_id((yield SelectIn(ITEMS, "id", item_ids)))
    # Fires and wakeups carry their pair's offset in their message (the scheduler
    # read it); an event is accepted without one, so it is read here. The table
    # holds only advanced pairs: a handful, read by user and matched whole.
    offsets: dict[str, float] = {}
    if events:
        pairs: dict[tuple[str, str, str], list[str]] = {}
        for event_id, e in events.items():
            pairs.setdefault((e["project_id"], e["agent_id"], e["user_id"]), []).append(event_id)
        users = sorted({user for _, _, user in pairs})
        for row in (yield SelectIn(OFFSETS, "user_id", users)):
            if row["offset_s"]:
                for event_id in pairs.get((row["project_id"], row["agent_id"], row["user_id"]), []):
                    offsets[event_id] = float(row["offset_s"])
    return Sources(todo, duplicates, fires, wakeups, events, schedules, items, offsets)


def _by_instant(wakeups: Mapping[str, datetime]) -> list[tuple[datetime, list[str]]]:
    """Wakeup ids grouped by ``executed_at`` (one statement each), in first-seen order."""
    groups: dict[datetime, set[str]] = {}
    for wakeup_id, at in wakeups.items():
        groups.setdefault(at, set()).add(wakeup_id)
    return [(at, sorted(ids)) for at, ids in groups.items()]


def writing(batch: NotificationBatch) -> Steps[Written]:
    """
    Write ``batch``, in this order, inside the transaction the steps run in:

    1. drop the ``staged`` notifications of ``batch.replace`` and their unsent
       outbox entries (visible notifications are never touched);
    2. move each wakeup of ``batch.wakeups`` from ``pending`` to ``executed``
       at its instant. One no longer ``pending`` (cancelled meanwhile) is lost:
       its notification and outbox entry are not written. The ``UPDATE ...
       WHERE status = 'pending'`` takes the row lock on PostgreSQL and runs
       alone on SQLite, so a cancel racing the dispatcher either wins (no
       notification) or finds the wakeup executed;
    3. move ``batch.events`` from ``accepted`` to ``dispatched``;
    4. the attention budget (:func:`budgeting`): lock each budgeted user's counter,
       count their recent messages and suppress what is over (no outbox entry);
    5. supersede the users' live messages that share a new one's ``supersede_key``
       (:func:`delivery.store.policy.superseding`);
    6. insert the notifications, skipping any whose ``source_id`` has one;
    7. insert the outbox entries of the rows still live, skipping any whose
       ``msg_id`` is queued;
    8. stamp the outbox entries of ``batch.sent`` sent at ``batch.now``: the
       entries of handed-off fires, which the relay holds back until it is sure
       no notification of theirs committed; this commit is that proof.
    """
    yield from dropping_staged(batch.replace)
    executed: set[str] = set()
    for at, ids in _by_instant(batch.wakeups):
        executed.update(
            (
                yield UpdateIn(
                    WAKEUPS,
                    "id",
                    ids,
                    {"status": "executed", "executed_at": at},
                    {"status": "pending"},
                )
            )
        )
    lost = [wakeup_id for wakeup_id in batch.wakeups if wakeup_id not in executed]
    events = sorted(set(batch.events))
    if events:
        yield UpdateIn(EVENTS, "id", events, {"status": "dispatched"}, {"status": "accepted"})
    gone = set(lost)
    rows = [r for r in batch.notifications if r["source_id"] not in gone]
    keyed = any(r.get("supersede_key") for r in rows)
    if keyed:
        # Within the batch the newest of a key is the one message left: it, not a
        # stale one, is what the budget then spends a unit on.
        rows = _newest_per_key(rows)
    if batch.budgets:
        rows = yield from budgeting(rows, batch.budgets, batch.now, batch.offsets)
    if keyed:
        yield from superseding(rows)
    kept = {r["id"] for r in rows if r["status"] in LIVE}
    outbox = [o for o in batch.outbox if o["msg_id"] in kept]
    yield InsertIgnoring(NOTIFICATIONS, rows, ("source_id",))
    yield InsertIgnoring(OUTBOX, outbox, ("msg_id",))
    if batch.sent:
        if batch.now is None:
            raise ValueError("a batch that stamps outbox entries sent needs its now")
        yield UpdateIn(OUTBOX, "msg_id", sorted(set(batch.sent)), {"sent_at": batch.now})
    return Written(rows, lost)


class InboxAction(StrEnum):
    """
    An inbox state change (the wire values of the inbox routes).

    The three inbox flags are independent instants beside ``status``: ``seen``
    (shown in a list: clears the badge), ``read`` (opened; implies seen),
    ``archived`` (out of the inbox view, kept). Setting a flag already set keeps
    its first instant, so repeating an action changes nothing.
    """

    SEEN = "seen"
    READ = "read"
    UNREAD = "unread"
    ARCHIVE = "archive"
    UNARCHIVE = "unarchive"


@dataclass(frozen=True, slots=True)
class InboxFilter:
    """
    Which messages a queue read keeps by inbox state: ``None`` keeps both sides.

    Attributes:
        seen: True only seen ones, False only unseen ones.
        read: True only read ones, False only unread ones.
        archived: True only archived ones, False only those in the inbox.
    """

    seen: bool | None = None
    read: bool | None = None
    archived: bool | None = None

    @property
    def empty(self) -> bool:
        """True when nothing is filtered."""
        return self.seen is None and self.read is None and self.archived is None

    def conditions(self) -> list[ColumnElement[bool]]:
        """The WHERE terms of this filter."""
        conds: list[ColumnElement[bool]] = []
        for wanted, column in (
            (self.seen, _n.seen_at),
            (self.read, _n.read_at),
            (self.archived, _n.archived_at),
        ):
            if wanted is not None:
                conds.append(column.is_not(None) if wanted else column.is_(None))
        return conds


def _inbox_values(action: InboxAction, now: datetime) -> dict[str, Any]:
    """The column values ``action`` sets; a flag already set keeps its first instant."""
    keep = func.coalesce
    match action:
        case InboxAction.SEEN:
            return {"seen_at": keep(_n.seen_at, now)}
        case InboxAction.READ:
            return {"seen_at": keep(_n.seen_at, now), "read_at": keep(_n.read_at, now)}
        case InboxAction.UNREAD:
            return {"read_at": None}
        case InboxAction.ARCHIVE:
            return {"archived_at": keep(_n.archived_at, now)}
        case InboxAction.UNARCHIVE:
            return {"archived_at": None}


def _inbox_changes(action: InboxAction) -> ColumnElement[bool]:
    """The rows ``action`` would change (so the count says how many changed)."""
    match action:
        case InboxAction.SEEN:
            return _n.seen_at.is_(None)
        case InboxAction.READ:
            return _n.read_at.is_(None) | _n.seen_at.is_(None)
        case InboxAction.UNREAD:
            return _n.read_at.is_not(None)
        case InboxAction.ARCHIVE:
            return _n.archived_at.is_(None)
        case InboxAction.UNARCHIVE:
            return _n.archived_at.is_not(None)


@dataclass(frozen=True, slots=True)
class InboxCounts:
    """
    A badge's numbers over one agent's (or one user's) visible messages.

    Attributes:
        total: every message, archived or not.
        unseen: not archived and never seen (the badge).
        unread: not archived and not read.
        archived: archived.
        pending: not archived and still pending (neither consumed nor delivered).
    """

    total: int
    unseen: int
    unread: int
    archived: int
    pending: int


def budgeting(
    rows: Sequence[Mapping[str, Any]],
    budgets: Mapping[str, AttentionBudget],
    now: datetime | None,
    offsets: Mapping[str, float] | None = None,
) -> Steps[list[Mapping[str, Any]]]:
    """
    ``rows`` with those over their user's attention budget suppressed
    (``suppressed`` / ``attention_budget``), decided with the users' counters
    locked (:func:`delivery.store.policy.spending`), in the caller's transaction.

    A message of an advanced pair (its source in ``offsets``) is dated on the pair's
    clock, so it is decided there: at its own ``created_at`` (advance-time dates a
    day's messages over days), against the pair's own messages in the window ending
    at that instant (:func:`delivery.store.policy.pair_spent`,
    :func:`delivery.policy.allot_rolling`). The others share the user's budget in
    real time, as before, among the messages dated in real time.
    """
    candidates = [r for r in rows if r["project_id"] in budgets and r["status"] in LIVE]
    if not candidates:
        return list(rows)
    shifted = offsets or {}
    at = now if now is not None else max(r["created_at"] for r in candidates)
    users = [(r["project_id"], r["user_id"]) for r in candidates]
    windows = {p: b.window_s for p, b in budgets.items()}
    used = yield from spending(windows, users, at)
    asking: dict[UserOf, list[Mapping[str, Any]]] = {}
    on_pair: dict[PairOf, list[Mapping[str, Any]]] = {}
    for r in candidates:
        if shifted.get(r["source_id"]):
            on_pair.setdefault((r["project_id"], r["agent_id"], r["user_id"]), []).append(r)
        else:
            asking.setdefault((r["project_id"], r["user_id"]), []).append(r)
    over: set[str] = set()
    for user, wanting in asking.items():
        limit = budgets[user[0]].limit
        if used.get(user, 0) + len(wanting) <= limit:
            continue  # all of them fit: nothing to share out (the burst's case)
        _passed, suppressed = allot(
            [
                Candidate(r["id"], r["priority"] or Priority.NORMAL.value, r["fire_at"])
                for r in wanting
            ],
            used.get(user, 0),
            limit,
        )
        over.update(suppressed)
    if on_pair:
        since = {
            pair: min(r["created_at"] for r in wanting)
            - timedelta(seconds=budgets[pair[0]].window_s)
            for pair, wanting in on_pair.items()
        }
        spent = yield from pair_spent(since)
        for pair, wanting in on_pair.items():
            budget = budgets[pair[0]]
            _passed, suppressed = allot_rolling(
                [
                    Candidate(r["id"], r["priority"] or Priority.NORMAL.value, r["created_at"])
                    for r in wanting
                ],
                spent.get(pair, []),
                budget.limit,
                timedelta(seconds=budget.window_s),
            )
            over.update(suppressed)
    if not over:
        return list(rows)
    return [
        {**r, "status": SUPPRESSED, "status_reason": ATTENTION_BUDGET} if r["id"] in over else r
        for r in rows
    ]


def _newest_per_key(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Within one batch, only the latest live row per (project, user, key) stays live."""
    newest: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for r in rows:
        if r.get("supersede_key") and r["status"] in LIVE:
            key = (r["project_id"], r["user_id"], r["supersede_key"])
            seen = newest.get(key)
            if seen is None or (r["fire_at"], r["id"]) > (seen["fire_at"], seen["id"]):
                newest[key] = r
    latest = {r["id"] for r in newest.values()}
    return [
        {**r, "status": SUPERSEDED, "status_reason": SUPERSEDED_BY_KEY}
        if r.get("supersede_key") and r["status"] in LIVE and r["id"] not in latest
        else r
        for r in rows
    ]


class ConsumeOutcome(StrEnum):
    """What :meth:`NotificationQueue.consume_notification` did."""

    CONSUMED = "consumed"
    ALREADY = "already"
    NOT_FOUND = "not_found"
    NOT_PENDING = "not_pending"


class NotificationQueue(Protocol):
    """
    What the API's queue routes rely on: a project's notifications as clients
    see them.

    Invariants: a ``staged`` notification (composed ahead of its instant) does
    not exist for clients, in any read or write here; consuming or
    acknowledging twice changes nothing the second time.
    """

    async def list_queue(
        self,
        project_id: str,
        agent_id: str,
        *,
        status: str | None,
        user_id: str | None,
        limit: int,
        inbox: InboxFilter | None = None,
        now: datetime | None = None,
    ) -> Sequence[Mapping[str, Any]]:
        """
        The agent's queue in one status (``None``: every visible status), kept by
        ``inbox``, oldest first (a queue is read in order); with ``now``, pending
        messages past their deadline are left out (they are expired, whether or not
        the sweep has marked them yet).
        """
        ...

    async def set_inbox_state(
        self,
        project_id: str,
        agent_id: str,
        action: InboxAction,
        *,
        now: datetime,
        message_ids: Sequence[str] | None = None,
        user_id: str | None = None,
    ) -> int:
        """
        Apply ``action`` to the listed messages of the agent, or (``message_ids``
        ``None``) to every message of ``user_id``; how many changed. One statement:
        all of them or none.
        """
        ...

    async def inbox_state(
        self, project_id: str, agent_id: str, message_id: str
    ) -> RowMapping | None:
        """One message's queue columns (with its inbox instants), or ``None``."""
        ...

    async def inbox_counts(
        self, project_id: str, agent_id: str, *, user_id: str | None
    ) -> InboxCounts:
        """The badge counts of the agent's (or one user's) visible messages."""
        ...

    async def notification_history(
        self,
        project_id: str,
        agent_id: str,
        *,
        limit: int,
        before: tuple[datetime, str] | None = None,
    ) -> Sequence[RowMapping]:
        """
        Every notification of the agent, every status and user, newest first
        (``created_at``, then ``id``); with ``before`` (a row's ``created_at`` and
        ``id``) only the rows after it in that order: the next page.
        """
        ...

    async def consume_notification(
        self, project_id: str, agent_id: str, message_id: str, now: datetime
    ) -> ConsumeOutcome:
        """Mark a pending message consumed; consuming it again is a no-op."""
        ...

    async def list_project_notifications(
        self,
        project_id: str,
        *,
        agent_id: str | None,
        event_type: str | None,
        ack_status: str | None,
        limit: int,
    ) -> Sequence[RowMapping]:
        """The project view, oldest first, optionally filtered."""
        ...

    async def acknowledge(self, project_id: str, ids: Sequence[str], now: datetime) -> int:
        """Acknowledge the listed pending notifications; how many changed."""
        ...

    async def acknowledge_all(
        self, project_id: str, *, agent_id: str | None, event_type: str | None, now: datetime
    ) -> int:
        """Acknowledge every pending notification matching the filters; how many."""
        ...


_QUEUE_COLUMNS = (
    _n.id,
    _n.agent_id,
    _n.user_id,
    _n.check_type,
    _n.generated_message,
    _n.status,
    _n.created_at,
    _n.consumed_at,
    _n.wakeup_id,
    _n.source_type,
    _n.intent,
    _n.seen_at,
    _n.read_at,
    _n.archived_at,
)
"""What the queue and history routes show of a notification."""
_QUEUE_NAMES = tuple(c.name for c in _QUEUE_COLUMNS)
_INLINE_STATUSES = frozenset({"pending", "consumed", "expired", "failed_generation"})
"""The queue statuses :func:`_queue_page` writes into its statement's text."""
_OWNER_COLUMNS = frozenset({"project_id", "agent_id", "user_id"})
_QUEUE_CODEC = direct.codec(NOTIFICATIONS).only(_QUEUE_NAMES)


def _queue_page(
    db: sqlite3.Connection,
    *,
    owner: Mapping[str, str],
    status: str,
    limit: int,
    after: datetime | None,
) -> list[dict[str, Any]]:
    """
    The queue read of :func:`delivery.store.direct.select_where` (same statement, same
    rows), with the status written into the statement instead of bound.

    A bound ``status = ?`` makes SQLite prepare the statement again at every run: the
    value might make the partial index ``ix_notifications_expiring`` (``status IN
    ('pending', 'staged')``) usable, so SQLite replans for each binding. That was 40 of
    the read's 70 µs (``EXPLAIN``-identical plans, 1000 rows, 3000 runs each); with the
    status in the text the prepared statement is reused. ``status`` is one of
    :data:`_INLINE_STATUSES` (checked by the caller), never a caller's string.
    """
    # Identifiers and the status are interpolated: only known ones pass.
    if status not in _INLINE_STATUSES or not set(owner) <= _OWNER_COLUMNS:
        raise ValueError(f"not a queue read: {status!r}, {sorted(owner)}")
    c = _QUEUE_CODEC
    where = [f'"{name}" = ?' for name in owner]
    params: list[Any] = list(owner.values())
    where.append(f"\"status\" = '{status}'")
    if after is not None:
        # A pending message past its deadline is expired, swept or not.
        where.append('("expires_at" IS NULL OR "expires_at" > ?)')
        params.append(sqlite_instant(after))
    names = ",".join(f'"{name}"' for name in c.columns)
    sql = (
        f'SELECT {names} FROM "notifications" WHERE {" AND ".join(where)}'  # noqa: S608
        ' ORDER BY "created_at","id" LIMIT ?'
    )
    params.append(limit)
    return [c.row(values) for values in db.execute(sql, params).fetchall()]


class SqlNotificationStore(StoreBase):
    """
    :class:`NotificationStore`, :class:`NotificationFeed` and
    :class:`NotificationQueue` over one engine.

    Args:
        engine: from :func:`delivery.store.engine.create_engine`; never closed here.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._runner = Runner(engine, reader=self._reader)

    async def load_sources(self, refs: Sequence[SourceRef]) -> Sources:
        """See :meth:`NotificationStore.load_sources`."""
        return await self._runner.read(loading(refs))

    async def write_notifications(self, batch: NotificationBatch) -> Written:
        """
        See :meth:`NotificationStore.write_notifications`. On SQLite the
        transaction is not part of a request's unit of work (the dispatcher
        writes outside requests; advance-time runs :func:`writing` in its own).
        """
        return await self._runner.write(writing(batch))

    async def pending_by_id(self, ids: Sequence[str], now: datetime) -> dict[str, StoredRow]:
        """See :meth:`NotificationFeed.pending_by_id`."""
        stmt = select(*STREAM_COLUMNS).where(_n.id.in_(ids), _n.status == "pending", live_at(now))
        async with self.engine.connect() as conn:
            return {r["id"]: r for r in (await conn.execute(stmt)).mappings()}

    async def pending_after(
        self, owner: UserKey, after_id: str | None, limit: int, now: datetime
    ) -> list[StoredRow]:
        """See :meth:`NotificationFeed.pending_after`."""
        project_id, agent_id, user_id = owner
        mine = owned(NOTIFICATIONS, project_id, agent_id=agent_id, user_id=user_id)
        async with self.engine.connect() as conn:
            cursor = None
            if after_id:
                cursor = (
                    await conn.execute(select(_n.created_at, _n.id).where(_n.id == after_id, *mine))
                ).one_or_none()
            stmt = select(*STREAM_COLUMNS).where(*mine, _n.status == "pending", live_at(now))
            if cursor is not None:
                stmt = stmt.where(tuple_(_n.created_at, _n.id) > tuple_(cursor[0], cursor[1]))
            stmt = stmt.order_by(_n.created_at, _n.id).limit(limit)
            return list((await conn.execute(stmt)).mappings().all())

    # --- the queue as clients see it ------------------------------------------------

    async def list_queue(
        self,
        project_id: str,
        agent_id: str,
        *,
        status: str | None,
        user_id: str | None,
        limit: int,
        inbox: InboxFilter | None = None,
        now: datetime | None = None,
    ) -> Sequence[Mapping[str, Any]]:
        """
        See :meth:`NotificationQueue.list_queue`: the polling path, so one call to
        SQLite's driver thread (:mod:`delivery.store.steps`) when neither an inbox
        filter nor "every status" is asked for (the SDK's reads).
        """
        if status is None or (inbox is not None and not inbox.empty):
            conds = [
                *owned(NOTIFICATIONS, project_id, agent_id=agent_id, user_id=user_id),
                _n.status != STAGED if status is None else _n.status == status,
                *(inbox.conditions() if inbox is not None else ()),
            ]
            if now is not None:
                # A pending message past its deadline is expired, swept or not.
                conds.append(or_(_n.status != "pending", live_at(now)))
            stmt = select(*_QUEUE_COLUMNS).where(*conds).order_by(_n.created_at, _n.id).limit(limit)
            async with self.read() as conn:
                return [dict(r) for r in (await conn.execute(stmt)).mappings()]
        mine = owned_values(project_id, agent_id=agent_id, user_id=user_id)
        step = SelectWhere(
            NOTIFICATIONS,
            {**mine, "status": status},
            columns=_QUEUE_NAMES,
            order_by=("created_at", "id"),
            limit=limit,
            after=("expires_at", now) if now is not None and status == "pending" else None,
        )
        if self._runner.driver_thread and status in _INLINE_STATUSES:
            # The SDK's poll: on the loop's own SQLite connection when it can be
            # (delivery.store.engine.read_on_loop), the driver's thread otherwise.
            live_after = now if now is not None and status == "pending" else None
            page = partial(_queue_page, owner=mine, status=status, limit=limit, after=live_after)
            rows = read_on_loop(self.engine, page)
            if rows is not None:
                return rows
            return await direct.read(self.engine, page)
        return await self._runner.read(selecting(step))

    async def set_inbox_state(
        self,
        project_id: str,
        agent_id: str,
        action: InboxAction,
        *,
        now: datetime,
        message_ids: Sequence[str] | None = None,
        user_id: str | None = None,
    ) -> int:
        """See :meth:`NotificationQueue.set_inbox_state`."""
        conds = [
            *owned(NOTIFICATIONS, project_id, agent_id=agent_id, user_id=user_id),
            _n.status != STAGED,
            _inbox_changes(action),
        ]
        if message_ids is not None:
            if not message_ids:
                return 0
            conds.append(_n.id.in_(list(message_ids)))
        async with self.write() as conn:
            result = await conn.execute(
                update(NOTIFICATIONS).where(*conds).values(**_inbox_values(action, now))
            )
        return int(result.rowcount or 0)

    async def inbox_state(
        self, project_id: str, agent_id: str, message_id: str
    ) -> RowMapping | None:
        """See :meth:`NotificationQueue.inbox_state`."""
        stmt = select(*_QUEUE_COLUMNS).where(
            *owned(NOTIFICATIONS, project_id, agent_id=agent_id, id=message_id),
            _n.status != STAGED,
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().one_or_none()

    async def inbox_counts(
        self, project_id: str, agent_id: str, *, user_id: str | None
    ) -> InboxCounts:
        """See :meth:`NotificationQueue.inbox_counts`: one aggregate statement."""
        inbox = _n.archived_at.is_(None)

        def count(cond: ColumnElement[bool]) -> Any:
            return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

        stmt = select(
            func.count(),
            count(inbox & _n.seen_at.is_(None)),
            count(inbox & _n.read_at.is_(None)),
            count(_n.archived_at.is_not(None)),
            count(inbox & (_n.status == "pending")),
        ).where(
            *owned(NOTIFICATIONS, project_id, agent_id=agent_id, user_id=user_id),
            # What the user never received (staged, or held back by a delivery policy)
            # is no message of theirs to count.
            _n.status.not_in((STAGED, SUPPRESSED, SUPERSEDED, EXPIRED)),
        )
        async with self.read() as conn:
            total, unseen, unread, archived, pending = (await conn.execute(stmt)).one()
        return InboxCounts(int(total), int(unseen), int(unread), int(archived), int(pending))

    async def notification_history(
        self,
        project_id: str,
        agent_id: str,
        *,
        limit: int,
        before: tuple[datetime, str] | None = None,
    ) -> Sequence[RowMapping]:
        """See :meth:`NotificationQueue.notification_history`."""
        conds = [*owned(NOTIFICATIONS, project_id, agent_id=agent_id), _n.status != STAGED]
        if before is not None:
            # Keyset, not offset: rows written meanwhile never shift a page.
            at, last_id = before
            conds.append((_n.created_at < at) | ((_n.created_at == at) & (_n.id < last_id)))
        stmt = (
            select(*_QUEUE_COLUMNS)
            .where(*conds)
            .order_by(_n.created_at.desc(), _n.id.desc())
            .limit(limit)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def consume_notification(
        self, project_id: str, agent_id: str, message_id: str, now: datetime
    ) -> ConsumeOutcome:
        """
        Mark a pending message consumed; consuming it again is a no-op.

        Returns:
            ``CONSUMED`` when this call changed it, ``ALREADY`` when it was
            consumed before, ``NOT_PENDING`` for expired / failed ones,
            ``NOT_FOUND`` for an unknown or foreign id.
        """
        owner = (
            *owned(NOTIFICATIONS, project_id, agent_id=agent_id, id=message_id),
            _n.status != STAGED,
        )
        async with self.write() as conn:
            result = await conn.execute(
                update(NOTIFICATIONS)
                # Past its deadline a message is expired, swept or not: never consumed.
                .where(
                    *owner,
                    _n.status == "pending",
                    live_at(now),
                )
                .values(status="consumed", consumed_at=now)
            )
            if result.rowcount:
                return ConsumeOutcome.CONSUMED
            status = (await conn.execute(select(_n.status).where(*owner))).scalar_one_or_none()
        if status is None:
            return ConsumeOutcome.NOT_FOUND
        return ConsumeOutcome.ALREADY if status == "consumed" else ConsumeOutcome.NOT_PENDING

    async def list_project_notifications(
        self,
        project_id: str,
        *,
        agent_id: str | None,
        event_type: str | None,
        ack_status: str | None,
        limit: int,
    ) -> Sequence[RowMapping]:
        """See :meth:`NotificationQueue.list_project_notifications`."""
        conds = [*owned(NOTIFICATIONS, project_id, agent_id=agent_id), _n.status != STAGED]
        if event_type is not None:
            conds.append(_n.event_type == event_type)
        if ack_status is not None:
            conds.append(_n.ack_status == ack_status)
        stmt = (
            select(
                _n.id,
                _n.project_id,
                _n.agent_id,
                _n.user_id,
                _n.event_type,
                _n.ack_status,
                _n.payload_json,
                _n.created_at,
                _n.acknowledged_at,
            )
            .where(*conds)
            .order_by(_n.created_at, _n.id)
            .limit(limit)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def acknowledge(self, project_id: str, ids: Sequence[str], now: datetime) -> int:
        """Acknowledge the listed pending notifications of the project; returns how many changed."""
        if not ids:
            return 0
        conds = (*owned(NOTIFICATIONS, project_id), _n.id.in_(list(ids)))
        return await self._acknowledge(conds, now)

    async def acknowledge_all(
        self, project_id: str, *, agent_id: str | None, event_type: str | None, now: datetime
    ) -> int:
        """Acknowledge every pending notification matching the filters; returns the count."""
        conds = owned(NOTIFICATIONS, project_id, agent_id=agent_id)
        if event_type is not None:
            conds.append(_n.event_type == event_type)
        return await self._acknowledge(conds, now)

    async def _acknowledge(self, conds: Sequence[ColumnElement[bool]], now: datetime) -> int:
        async with self.write() as conn:
            result = await conn.execute(
                update(NOTIFICATIONS)
                .where(*conds, _n.ack_status == "pending", _n.status != STAGED)
                .values(ack_status="acknowledged", acknowledged_at=now)
            )
        return int(result.rowcount or 0)


def notification_store(db: NotificationStore | AsyncEngine) -> NotificationStore:
    """``db`` itself, or the SQL store over it when the caller holds only an engine."""
    return SqlNotificationStore(db) if isinstance(db, AsyncEngine) else db
