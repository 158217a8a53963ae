"""
Webhook persistence: endpoints for the API, the durable delivery queue and the
attempts log for the handlers. SQLAlchemy Core throughout, one transaction per call.

Every API-facing method takes the caller's ``project_id`` and filters on it.
Secrets arrive and leave *sealed* (:class:`delivery.secrets.SecretBox`):
this module never sees one in clear.

Queue contract (what :class:`WebhookStore` guarantees the worker):

- :meth:`WebhookStore.enqueue` is idempotent: one delivery per (notification, endpoint).
- :meth:`WebhookStore.claim_due` hands each due delivery to one caller: ``FOR UPDATE
  SKIP LOCKED`` on PostgreSQL, the single SQLite writer lock otherwise. A claim is a
  lease: ``next_attempt_at`` moves to the lease's end, so a killed worker's delivery is
  due again by itself.
- :meth:`WebhookStore.record_attempt` writes the attempt and the delivery's next state
  in one transaction; on success it also consumes the notification.
- :meth:`WebhookStore.resend` and :meth:`WebhookStore.recover` put finished
  deliveries back in the queue (the same rows, so the worker records their attempts
  like any other) and are idempotent: a delivery already pending is left alone, one
  statement per step, each guarded by the status it changes.

Endpoint health: the same transaction keeps the endpoint's ``failing_since`` (the
first failure of the current streak; a 2xx clears it) and disables the endpoint when
a receiver answers 410 or when the streak has lasted ``disable_after``. A disable
records its reason and instant on the endpoint and adds one
:data:`ENDPOINT_DISABLED` notification to the project feed (``GET
/api/v1/projects/{projectId}/notifications``): a ``notifications`` row of status
:data:`SYSTEM`, with no agent or user, so no agent queue, stream, timeline or
worker ever reads it, acknowledged like any project notification.
"""

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    Integer,
    String,
    Text,
    and_,
    any_,
    bindparam,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.domain import payload_json
from delivery.policy import past_deadline
from delivery.store import direct
from delivery.store.common import StoreBase, insert_ignoring_duplicates, new_id, owned
from delivery.store.direct import sqlite_instant
from delivery.store.notifications import live_at
from delivery.store.tables import DELIVERIES, ENDPOINTS, NOTIFICATIONS
from delivery.store.tables import WEBHOOK_ATTEMPTS as ATTEMPTS
from delivery.store.types import UTCDateTime

PENDING = "pending"
DELIVERED = "delivered"
DEAD = "dead"
SKIPPED = "skipped"
SUCCESS = "success"
"""An attempt's status for a 2xx (the other is ``failed``)."""

ENDPOINT_DISABLED = "webhook.endpoint_disabled"
"""The event type of the project notification a disabled endpoint adds."""
SYSTEM = "system"
"""Status (and source type) of notifications the service writes about itself."""


@dataclass(frozen=True, slots=True)
class EndpointDisabled:
    """
    An endpoint disabled by an attempt, as recorded.

    Attributes:
        endpoint_id: the endpoint.
        reason: the recorded reason.
        disabled_at: when.
        failing_since: the first failure of the streak (``None`` for a 410 on a
            healthy endpoint: nothing failed before it).
        notification_id: the project notification written.
    """

    endpoint_id: str
    reason: str
    disabled_at: datetime
    failing_since: datetime | None
    notification_id: str

    @property
    def recover_since(self) -> datetime:
        """Where a recovery should start: the first failure, else the disable itself."""
        return self.failing_since or self.disabled_at


@dataclass(frozen=True, slots=True)
class Enabled:
    """
    What :meth:`WebhookStore.enable_endpoint` did.

    Attributes:
        was_disabled: False when the endpoint was active already (nothing changed).
        disabled_at: when it had been disabled.
        disabled_reason: why.
        failing_since: the first failure of the streak that disabled it, if any.
    """

    was_disabled: bool
    disabled_at: datetime | None = None
    disabled_reason: str | None = None
    failing_since: datetime | None = None
    earliest_undelivered: datetime | None = None

    @property
    def recover_since(self) -> datetime | None:
        """
        Where a recovery should start: the first failure of the streak (every message
        from then on may have been dead-lettered before the disable), or the disable
        instant; and earlier still when a message that failed in that time was made
        before it (a recovery selects messages by when they were made, and a failure
        is recorded after its message was).
        """
        start = self.failing_since or self.disabled_at
        if start is None or self.earliest_undelivered is None:
            return start
        return min(start, self.earliest_undelivered)


def streak_reason(failing_since: datetime, limit: timedelta) -> str:
    """The recorded reason of a disable for a failing streak (pure)."""
    return (
        f"no successful attempt since {failing_since.isoformat()} "
        f"(disabled after failing continuously for {int(limit.total_seconds())} s)"
    )


def _disabled_notice(
    endpoint: RowMapping, reason: str, now: datetime, failing_since: datetime | None
) -> dict[str, Any]:
    """The project notification of a disabled endpoint (a ``notifications`` row)."""
    notice_id = new_id("msg")
    recover = failing_since or now
    payload = {
        "endpoint_id": endpoint["id"],
        "event_type": endpoint["event_type"],
        "webhook_url": endpoint["url"],
        "reason": reason,
        "disabled_at": now.isoformat(),
        "failing_since": None if failing_since is None else failing_since.isoformat(),
        "recover_since": recover.isoformat(),
    }
    return {
        "id": notice_id,
        "project_id": endpoint["project_id"],
        # No agent or user: no queue, stream or timeline of anyone reads it.
        "agent_id": "",
        "user_id": "",
        "source_type": SYSTEM,
        "source_id": notice_id,
        "event_type": ENDPOINT_DISABLED,
        "check_type": ENDPOINT_DISABLED,
        "intent": "",
        "generated_message": f"webhook endpoint {endpoint['url']} "
        f"({endpoint['event_type']}) disabled: {reason}",
        "status": SYSTEM,
        "fire_at": now,
        "payload_json": payload_json(payload),
        "ack_status": "pending",
        "created_at": now,
    }


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """What :meth:`WebhookStore.upsert_endpoint` did: ``created`` is a first registration."""

    endpoint_id: str
    created: bool


@dataclass(frozen=True, slots=True)
class AttemptPage:
    """One page of attempts, newest first; ``next_cursor`` is ``None`` on the last page."""

    rows: Sequence[RowMapping]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class NewNotification:
    """The part of a ``notification.created`` message the queue needs."""

    notification_id: str
    project_id: str
    event_type: str


@dataclass(frozen=True, slots=True)
class ClaimedDelivery:
    """
    A delivery handed to one worker, with everything needed to send it.

    ``notification_status`` is read in the claiming transaction: anything but
    ``pending`` means polling consumed it first (or it expired) and it is not sent.
    Secrets are sealed; the worker opens them.
    """

    delivery_id: str
    project_id: str
    endpoint_id: str
    event_id: str
    event_type: str
    attempt_number: int
    """The number of the attempt about to be made (1-based)."""
    url: str
    secret_enc: str
    previous_secret_enc: str | None
    rotated_at: datetime | None
    auth_header_enc: str | None
    endpoint_active: bool
    notification: Mapping[Any, Any] | None
    """
    The notification row (on SQLite only the columns sending reads:
    ``_NOTE_COLUMNS``); ``None`` if it no longer exists.
    """
    round_start: int = 0
    """The attempt count the current round began at: 0, or where a re-send started."""
    force_send: bool = False
    """An explicit re-send: sent even though the notification was consumed."""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """An attempt to store (the attempt's wire fields plus correlation ids)."""

    attempt_id: str
    attempt_number: int
    event_id: str
    webhook_url: str
    status: str
    response_code: int
    duration_ms: int
    created_at: datetime
    request_body: str | None
    response_body: str | None
    error_message: str | None


@dataclass(frozen=True, slots=True)
class Requeued:
    """
    What :meth:`WebhookStore.resend` did: ``queued`` is False when the delivery was
    already pending (a repeated call), so nothing was queued twice.
    """

    delivery_id: str
    event_id: str
    queued: bool


@dataclass(frozen=True, slots=True)
class Recovered:
    """What :meth:`WebhookStore.recover` queued: failed deliveries again, missing ones new."""

    requeued: int
    created: int


class EndpointMissingError(LookupError):
    """No endpoint is registered for the (project, event type)."""


class EndpointDisabledError(RuntimeError):
    """The endpoint is disabled; ``reason`` says why."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason or "disabled")
        self.reason = reason


class MessageEndedError(RuntimeError):
    """The message can no longer be sent; ``status`` says why (``expired`` and so on)."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True, slots=True)
class NextState:
    """
    What becomes of a delivery after an attempt.

    Exactly one of: ``delivered`` (consume the notification too), ``retry_at`` (stay
    pending), or ``dead`` (give up; ``disable_reason`` also disables the endpoint).
    """

    delivered: bool = False
    retry_at: datetime | None = None
    dead: bool = False
    reason: str | None = None
    disable_reason: str | None = None


@dataclass(frozen=True, slots=True)
class RecordedAttempt:
    """One item of :meth:`WebhookStore.record_attempts`: an attempt made at ``now``."""

    claimed: ClaimedDelivery
    attempt: AttemptRecord
    step: NextState
    now: datetime


_PER_ENDPOINT_CLAIM = text(
    """
    WITH RECURSIVE endpoints(id) AS (
        SELECT min(endpoint_id) FROM webhook_deliveries WHERE status = 'pending'
      UNION ALL
        SELECT (
            SELECT min(d.endpoint_id) FROM webhook_deliveries d
            WHERE d.status = 'pending' AND d.endpoint_id > endpoints.id
        )
        FROM endpoints WHERE endpoints.id IS NOT NULL
    ),
    free AS (
        SELECT id, GREATEST(0, LEAST(
            :limit, :cap - COALESCE((:busy_n)[array_position(:busy_ids, id)], 0)
        )) AS slots
        FROM endpoints WHERE id IS NOT NULL
    ),
    candidates AS (
        SELECT due.id, due.next_attempt_at
        FROM free CROSS JOIN LATERAL (
            SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
            WHERE d.status = 'pending' AND d.endpoint_id = free.id
              AND d.next_attempt_at <= :now
            ORDER BY d.next_attempt_at
            LIMIT free.slots
        ) AS due
        WHERE free.slots > 0
        ORDER BY due.next_attempt_at
        LIMIT :limit
    )
    SELECT d.id
    FROM webhook_deliveries d JOIN candidates c ON c.id = d.id
    WHERE d.status = 'pending' AND d.next_attempt_at <= :now
    ORDER BY c.next_attempt_at
    FOR UPDATE OF d SKIP LOCKED
    """
).bindparams(
    bindparam("now", type_=UTCDateTime()),
    bindparam("limit", type_=Integer()),
    bindparam("cap", type_=Integer()),
    bindparam("busy_ids", type_=ARRAY(String)),
    bindparam("busy_n", type_=ARRAY(Integer)),
)
"""
PostgreSQL's claim (:meth:`WebhookStore._claim_per_endpoint`): the endpoints with
pending deliveries by a skip scan of ``ix_webhook_deliveries_pending``, then per
endpoint its oldest due rows, at most its free slots (``cap`` less ``busy_n`` for the
endpoints named in ``busy_ids``); the oldest ``limit`` of all of them, and only those
locked (``SKIP LOCKED``, their status and due time checked again on the locked row).
"""


_SQLITE_CLAIMED = (
    "SELECT d.id, d.project_id, d.endpoint_id, d.event_id, d.event_type, d.attempt_count, "
    "d.notification_id, d.round_start, d.force_send, e.url, e.secret_enc, "
    "e.previous_secret_enc, e.rotated_at, e.auth_header_enc, e.is_active "
    "FROM webhook_deliveries d LEFT OUTER JOIN webhook_endpoints e ON e.id = d.endpoint_id "
    "WHERE d.id IN ({marks})"
)
"""What sending a claimed delivery needs, in the order :func:`_sqlite_claimed` reads it."""
_NOTE_COLUMNS = (
    "id",
    "project_id",
    "agent_id",
    "user_id",
    "event_type",
    "check_type",
    "intent",
    "generated_message",
    "created_at",
    "status",
    "expires_at",
    "payload_json",
)
"""
The notification's columns a claimed delivery reads on SQLite (the worker's checks,
:meth:`handlers.base.Message.of_notification`, the attempt's owner): converting the
instants of the others was a visible share of the claim.
"""
_SQLITE_LEASE = (
    "UPDATE webhook_deliveries SET next_attempt_at = ?, claimed_by = ?, updated_at = ? "
    "WHERE id IN ({marks})"
)


def _sqlite_due(
    db: sqlite3.Connection, *, now: str, full: Sequence[str], limit: int
) -> list[tuple[str, str]]:
    """
    The (id, endpoint id) of up to ``limit`` pending deliveries due at ``now``, oldest
    due first, leaving out the endpoints in ``full`` (read from the due index's
    entries, which carry ``endpoint_id``).
    """
    sql = "SELECT id, endpoint_id FROM webhook_deliveries WHERE status = ? AND next_attempt_at <= ?"
    params: list[Any] = [PENDING, now]
    if full:
        sql += f" AND endpoint_id NOT IN ({','.join('?' * len(full))})"
        params += full
    return db.execute(sql + " ORDER BY next_attempt_at LIMIT ?", [*params, limit]).fetchall()


def _sqlite_claim(
    db: sqlite3.Connection,
    *,
    now: datetime,
    lease_end: datetime,
    worker_id: str,
    full: Sequence[str],
    limit: int,
    window: int,
    per_endpoint: int | None,
    in_flight: Mapping[str, int],
) -> tuple[list[tuple[Any, ...]], dict[str, dict[str, Any]]]:
    """
    :meth:`WebhookStore.claim_due` on SQLite, in one call to the driver's thread
    inside the write transaction (:func:`delivery.store.direct.write`): the same
    statements as through SQLAlchemy, without its compilation, parameter and row
    processing or a round trip through the event loop per statement (together about
    a sixth of the webhook worker's CPU under py-spy in
    ``bench/bench_webhooks_e2e.py``).

    ``in_flight`` (deliveries in flight by endpoint) is read, never changed: the
    claim counts what it takes on its own copy.

    Returns:
        The claimed rows (:data:`_SQLITE_CLAIMED`'s columns, in due order) and their
        notifications by id.
    """
    stamp = direct.sqlite_instant(now)
    ids: list[str] = []
    taken = dict(in_flight)
    for delivery_id, endpoint_id in _sqlite_due(db, now=stamp, full=full, limit=window):
        if len(ids) >= limit:
            break
        if per_endpoint is not None and taken.get(endpoint_id, 0) >= per_endpoint:
            continue
        taken[endpoint_id] = taken.get(endpoint_id, 0) + 1
        ids.append(delivery_id)
    rows: list[tuple[Any, ...]] = []
    lease = direct.sqlite_instant(lease_end)
    for start in range(0, len(ids), direct.MAX_VARIABLES):
        chunk = ids[start : start + direct.MAX_VARIABLES]
        marks = direct.marks(len(chunk))
        db.execute(_SQLITE_LEASE.format(marks=marks), (lease, worker_id, stamp, *chunk))
        rows += db.execute(_SQLITE_CLAIMED.format(marks=marks), chunk).fetchall()
    order = {delivery_id: i for i, delivery_id in enumerate(ids)}
    rows.sort(key=lambda r: order[r[0]])
    notes = direct.select_in(db, NOTIFICATIONS, "id", [r[6] for r in rows], columns=_NOTE_COLUMNS)
    return rows, {n["id"]: n for n in notes}


_SQLITE_ENDPOINTS = (
    "SELECT project_id, event_type, id FROM webhook_endpoints "
    "WHERE is_active = 1 AND (project_id, event_type) IN (VALUES {pairs})"
)


def _sqlite_endpoints(
    db: sqlite3.Connection, *, pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """
    The active endpoint's id per (project, event type) of ``pairs`` that has one: the
    read of :meth:`WebhookStore.enqueue` on SQLite, as SQLAlchemy writes it.
    """
    found: dict[tuple[str, str], str] = {}
    step = direct.MAX_VARIABLES // 2
    for start in range(0, len(pairs), step):
        chunk = pairs[start : start + step]
        sql = _SQLITE_ENDPOINTS.format(pairs=",".join(["(?, ?)"] * len(chunk)))
        for project_id, event_type, endpoint_id in db.execute(sql, [v for p in chunk for v in p]):
            found[(project_id, event_type)] = endpoint_id
    return found


def _sqlite_claimed(r: Sequence[Any], note: Mapping[str, Any] | None) -> "ClaimedDelivery":
    """A :data:`_SQLITE_CLAIMED` row as the claim returns it."""
    return ClaimedDelivery(
        delivery_id=r[0],
        project_id=r[1],
        endpoint_id=r[2],
        event_id=r[3],
        event_type=r[4],
        attempt_number=r[5] + 1,
        url=r[9] or "",
        secret_enc=r[10] or "",
        previous_secret_enc=r[11],
        rotated_at=None if r[12] is None else direct.parse_instant(r[12]),
        auth_header_enc=r[13],
        endpoint_active=bool(r[14]),
        notification=note,
        round_start=r[7],
        force_send=bool(r[8]),
    )


_SQLITE_ATTEMPT = (
    "INSERT INTO webhook_attempts (id, delivery_id, project_id, event_type, event_id, "
    "agent_id, user_id, attempt_number, webhook_url, status, response_code, duration_ms, "
    "request_body, response_body, error_message, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SQLITE_CONSUME = (
    "UPDATE notifications SET status = 'consumed', consumed_at = ? "
    "WHERE id = ? AND status = 'pending' AND EXISTS "
    "(SELECT 1 FROM webhook_deliveries WHERE id = ? AND status = 'pending')"
)
_SQLITE_DELIVERED = (
    "UPDATE webhook_deliveries SET attempt_count = ?, claimed_by = NULL, updated_at = ?, "
    "last_error = NULL, status = 'delivered', next_attempt_at = NULL, delivered_at = ? "
    "WHERE id = ? AND status = 'pending'"
)
_SQLITE_CLEAR_STREAKS = (
    "UPDATE webhook_endpoints SET failing_since = NULL "
    "WHERE id IN ({marks}) AND failing_since IS NOT NULL AND is_active = 1"
)


def _success_params(
    items: Sequence["RecordedAttempt"],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]], list[str]]:
    """
    The parameters of :func:`_sqlite_successes` for ``items`` (every one a 2xx), built
    on the caller's thread so the driver's thread only runs the statements.

    The same rows and order as :meth:`WebhookStore.record_attempts`' general path:
    consumes and deliveries in key order, the endpoints whose streak ends in key order.
    """
    attempts: list[tuple[Any, ...]] = []
    consumed: list[tuple[Any, ...]] = []
    delivered: list[tuple[Any, ...]] = []
    endpoints: set[str] = set()
    instant = direct.sqlite_instant
    for item in items:
        claimed, a = item.claimed, item.attempt
        note = claimed.notification
        now = instant(item.now)
        attempts.append(
            (
                a.attempt_id,
                claimed.delivery_id,
                claimed.project_id,
                claimed.event_type,
                a.event_id,
                None if note is None else note["agent_id"],
                None if note is None else note["user_id"],
                a.attempt_number,
                a.webhook_url,
                a.status,
                a.response_code,
                a.duration_ms,
                a.request_body,
                a.response_body,
                a.error_message,
                instant(a.created_at),
            )
        )
        consumed.append((now, claimed.event_id, claimed.delivery_id))
        delivered.append((a.attempt_number, now, now, claimed.delivery_id))
        endpoints.add(claimed.endpoint_id)
    consumed.sort(key=itemgetter(1))
    delivered.sort(key=itemgetter(3))
    return attempts, consumed, delivered, sorted(endpoints)


def _sqlite_successes(
    attempts: list[tuple[Any, ...]],
    consumed: list[tuple[Any, ...]],
    delivered: list[tuple[Any, ...]],
    endpoints: list[str],
    db: sqlite3.Connection,
) -> None:
    """
    :meth:`WebhookStore.record_attempts` for a batch of 2xx attempts on SQLite, in one
    call to the driver's thread inside the write transaction: the general path's
    statements, in its order, without SQLAlchemy's parameter processing or a round
    trip through the event loop per statement. Through SQLAlchemy one group commit
    held SQLite's one writer for about 70 ms (80 attempts, the loop busy at every
    round trip), which was the whole run's critical path in
    ``bench/bench_webhooks_e2e.py``: claims and enqueues queued behind it.
    """
    db.executemany(_SQLITE_ATTEMPT, attempts)
    # A 2xx consumes the notification only through a delivery this attempt finishes:
    # the delivery's status is read in this statement, before the deliveries change.
    db.executemany(_SQLITE_CONSUME, consumed)
    # Guarded by the status: a delivery finished meanwhile is left alone.
    db.executemany(_SQLITE_DELIVERED, delivered)
    for start in range(0, len(endpoints), direct.MAX_VARIABLES):
        chunk = endpoints[start : start + direct.MAX_VARIABLES]
        db.execute(_SQLITE_CLEAR_STREAKS.format(marks=direct.marks(len(chunk))), chunk)


class WebhookStore(StoreBase):
    """
    Webhook tables over one engine; the engine's owner disposes of it.

    Args:
        engine: an engine on a migrated schema.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        # Reads such as the attempts page run several statements that must agree.
        super().__init__(engine, autocommit_reads=False)

    @property
    def _direct(self) -> bool:
        """
        The queue's hot paths run as one function on SQLite's driver thread
        (:mod:`delivery.store.direct`): the enqueue, the claim and a batch of 2xx
        attempts. The one check that chooses every direct path, so they cannot
        disagree about the database; elsewhere (PostgreSQL) they go through SQLAlchemy.
        """
        return self.capabilities.driver_thread

    # --- endpoints (API) ------------------------------------------------------------

    async def upsert_endpoint(
        self,
        project_id: str,
        event_type: str,
        *,
        url: str,
        auth_header_enc: str | None,
        new_secret_enc: str,
        now: datetime,
    ) -> UpsertResult:
        """
        Register ``url`` for (project, event type), or replace the registered one.

        A first registration stores ``new_secret_enc``; a re-registration keeps the
        existing secret (it is shown once), replaces ``url`` and
        ``auth_header`` (PUT semantics: an absent header clears it) and re-enables an
        endpoint a 410 disabled. Safe under concurrent first registrations.
        """
        e = ENDPOINTS.c
        async with self.write() as conn:
            endpoint_id = new_id("whk")
            inserted = await insert_ignoring_duplicates(
                conn,
                ENDPOINTS,
                [
                    {
                        "id": endpoint_id,
                        "project_id": project_id,
                        "event_type": event_type,
                        "url": url,
                        "secret_enc": new_secret_enc,
                        "previous_secret_enc": None,
                        "rotated_at": None,
                        "auth_header_enc": auth_header_enc,
                        "is_active": True,
                        "disabled_reason": None,
                        "created_at": now,
                        "updated_at": now,
                    }
                ],
                unique=["project_id", "event_type"],
            )
            if inserted:
                return UpsertResult(endpoint_id, created=True)
            scope = and_(*owned(ENDPOINTS, project_id), e.event_type == event_type)
            await conn.execute(
                update(ENDPOINTS)
                .where(scope)
                .values(
                    url=url,
                    auth_header_enc=auth_header_enc,
                    is_active=True,
                    disabled_reason=None,
                    disabled_at=None,
                    failing_since=None,
                    updated_at=now,
                )
            )
            existing = (await conn.execute(select(e.id).where(scope))).scalar_one()
        return UpsertResult(existing, created=False)

    async def list_endpoints(self, project_id: str) -> Sequence[RowMapping]:
        """The project's endpoints, by event type."""
        e = ENDPOINTS.c
        stmt = select(ENDPOINTS).where(*owned(ENDPOINTS, project_id)).order_by(e.event_type)
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    async def delete_endpoint(
        self, project_id: str, event_type: str, *, now: datetime, reason: str
    ) -> bool:
        """
        Remove the endpoint; its pending deliveries become ``dead`` with ``reason``
        (their attempts stay visible). Returns False when nothing was registered.
        """
        e = ENDPOINTS.c
        async with self.write() as conn:
            endpoint_id = (
                await conn.execute(
                    select(e.id).where(*owned(ENDPOINTS, project_id), e.event_type == event_type)
                )
            ).scalar_one_or_none()
            if endpoint_id is None:
                return False
            await conn.execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.endpoint_id == endpoint_id, DELIVERIES.c.status == PENDING)
                .values(
                    status=DEAD,
                    next_attempt_at=None,
                    claimed_by=None,
                    last_error=reason,
                    updated_at=now,
                )
            )
            await conn.execute(delete(ENDPOINTS).where(e.id == endpoint_id))
        return True

    async def rotate_secret(
        self, project_id: str, event_type: str, *, new_secret_enc: str, now: datetime
    ) -> bool:
        """
        Make ``new_secret_enc`` current; the current one becomes the previous one, which
        keeps signing for 24 h from ``now``. A second rotation inside that
        window drops the oldest. Returns False when nothing was registered.
        """
        e = ENDPOINTS.c
        async with self.write() as conn:
            result = await conn.execute(
                update(ENDPOINTS)
                .where(*owned(ENDPOINTS, project_id), e.event_type == event_type)
                .values(
                    previous_secret_enc=e.secret_enc,
                    secret_enc=new_secret_enc,
                    rotated_at=now,
                    updated_at=now,
                )
            )
        return bool(result.rowcount)

    async def list_attempts(
        self, project_id: str, event_type: str, *, page_size: int, cursor: int | None
    ) -> AttemptPage:
        """
        Attempts for (project, event type), newest first, ``page_size`` at a time.

        ``cursor`` is the ``seq`` of the last attempt of the previous page; the
        next page starts strictly below it, so attempts recorded meanwhile never
        shift a page.
        """
        a = ATTEMPTS.c
        conds = [*owned(ATTEMPTS, project_id), a.event_type == event_type]
        if cursor is not None:
            conds.append(a.seq < cursor)
        stmt = select(ATTEMPTS).where(*conds).order_by(a.seq.desc()).limit(page_size + 1)
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        if len(rows) > page_size:
            rows = rows[:page_size]
            return AttemptPage(rows, next_cursor=str(rows[-1]["seq"]))
        return AttemptPage(rows, next_cursor=None)

    # --- the queue (worker) -----------------------------------------------------------

    async def enqueue(self, items: Iterable[NewNotification], *, now: datetime) -> int:
        """
        Queue one delivery, due ``now``, per notification whose project has an active
        endpoint for its event type. Repeats (a redelivered NATS message) are no-ops.

        Returns:
            How many deliveries were new.
        """
        wanted = list(items)
        if not wanted:
            return 0
        pairs = sorted({(n.project_id, n.event_type) for n in wanted})
        # Read outside the write transaction: most notifications have no endpoint,
        # and then nothing is written at all (a queue for SQLite's one writer).
        if self._direct:
            endpoints = await direct.read(self.engine, partial(_sqlite_endpoints, pairs=pairs))
        else:
            e = ENDPOINTS.c
            async with self.read() as conn:
                found = (
                    await conn.execute(
                        select(e.id, e.project_id, e.event_type).where(
                            tuple_(e.project_id, e.event_type).in_(pairs),
                            e.is_active.is_(True),
                        )
                    )
                ).all()
            endpoints = {(r.project_id, r.event_type): r.id for r in found}
        rows: list[dict[str, Any]] = []
        for n in wanted:
            endpoint_id = endpoints.get((n.project_id, n.event_type))
            if endpoint_id is None:
                continue
            # The notification id is the event id, the same on every attempt and after
            # any restart.
            rows.append(
                self._new_delivery(
                    new_id("whd"),
                    n.project_id,
                    endpoint_id,
                    n.notification_id,
                    n.event_type,
                    now=now,
                    force=False,
                )
            )
        if not rows:
            return 0
        if self._direct:
            # Through SQLAlchemy, its parameter processing (an instant's conversion per
            # row and column) and statement set-up were about a sixth of the webhook
            # worker's CPU in bench/bench_webhooks_e2e.py: the same insert, one call.
            insert = partial(
                direct.insert_ignoring_duplicates,
                table=DELIVERIES,
                rows=rows,
                unique=("notification_id", "endpoint_id"),
            )
            return await direct.write(self.engine, insert)
        async with self.write() as conn:
            return await insert_ignoring_duplicates(
                conn, DELIVERIES, rows, unique=["notification_id", "endpoint_id"]
            )

    async def claim_due(
        self,
        *,
        now: datetime,
        limit: int,
        lease: timedelta,
        worker_id: str,
        per_endpoint: int | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> list[ClaimedDelivery]:
        """
        Claim up to ``limit`` pending deliveries due at ``now``, oldest due first.

        Each claimed row's ``next_attempt_at`` becomes ``now + lease`` and
        ``claimed_by`` ``worker_id``: if the worker dies, the row is due again when
        the lease ends. The lease must outlast one attempt (the send timeout).

        With ``per_endpoint``, an endpoint that already has that many deliveries in
        flight (``in_flight``, by endpoint id) or claimed in this call gets no more:
        a backlog for one slow receiver cannot fill the worker and starve the others.
        Endpoints already at the cap are left out by the query itself, so their
        backlog, however long and however early due, never fills the rows looked at.
        On SQLite that is an ``endpoint_id NOT IN (...)`` filter on
        ``ix_webhook_deliveries_due``, which carries ``endpoint_id`` so that SQLite
        reads the filter from the index entries; PostgreSQL would check that filter on
        each table row, so there each endpoint's due rows are probed on their own
        (:meth:`_claim_per_endpoint`). Rows passed over stay due.
        """
        if not self._direct:
            # PostgreSQL: the claim's statement is its own (SKIP LOCKED, arrays).
            async with self.write() as conn:
                locked = await self._claim_per_endpoint(
                    conn, now=now, limit=limit, per_endpoint=per_endpoint, in_flight=in_flight
                )
                if not locked:
                    return []
                return await self._take(conn, locked, now=now, lease=lease, worker_id=worker_id)
        full = (
            sorted(e for e, n in in_flight.items() if n >= per_endpoint)
            if per_endpoint is not None and in_flight
            else []
        )
        # Read first, outside a write transaction: an empty claim never queues for
        # SQLite's one writer (see delivery.store.engine.any_row).
        probe = partial(_sqlite_due, now=sqlite_instant(now), full=full, limit=1)
        if not await direct.read(self.engine, probe):
            return []
        claim = partial(
            _sqlite_claim,
            now=now,
            lease_end=now + lease,
            worker_id=worker_id,
            full=full,
            limit=limit,
            # Look further than ``limit`` when capping per endpoint, so the rows passed
            # over for an endpoint that reaches its cap in this claim leave room for
            # other endpoints' rows.
            window=limit if per_endpoint is None else limit * 4,
            per_endpoint=per_endpoint,
            # Taken here, on the loop, as ``full`` was: the worker's map changes there
            # while the claim runs on the driver's thread.
            in_flight=dict(in_flight or {}),
        )
        rows, notes = await direct.write(self.engine, claim)
        return [_sqlite_claimed(r, notes.get(r[6])) for r in rows]

    async def _claim_per_endpoint(
        self,
        conn: AsyncConnection,
        *,
        now: datetime,
        limit: int,
        per_endpoint: int | None,
        in_flight: Mapping[str, int] | None,
    ) -> list[str]:
        """
        The ids :meth:`claim_due` takes on PostgreSQL, locked (``SKIP LOCKED``): each
        endpoint with pending deliveries gets an index probe of its own, for at most
        its free slots, and the oldest due of what those probes found win.

        The filter form (``endpoint_id NOT IN (...)`` on the due index) is checked by
        PostgreSQL on each table row after fetching it (``<>`` cannot be an index
        condition, and ``FOR UPDATE`` rules out an index-only scan), so a claim made
        while the endpoints with due rows were all at their cap read every due row to
        find none. Here the endpoints with pending rows are found by a skip scan of
        ``ix_webhook_deliveries_pending`` (one descent each), and each one's due rows
        are read in due order with the endpoint as an index condition (of that index,
        or of the due index, which carries ``endpoint_id``: the planner's choice),
        never more than the endpoint may take; an endpoint at its cap is not probed.
        No table row of another endpoint is read.
        Endpoints are enumerated from the deliveries, not the endpoints table, so a
        delivery whose endpoint was deleted while it was queued is still claimed (and
        ended by the worker).

        The probes read without locking; only the ``limit`` rows chosen are locked,
        so a claim over many endpoints with backlogs does not lock each one's free
        slots' worth of rows (with 1,000 such endpoints and 32 slots, 32,000 row locks
        to take 256) and leave another replica's claim at the same moment empty. A
        chosen row another replica locked is skipped, not replaced (the next claim
        takes others); one it claimed and committed meanwhile fails the re-check of
        its status and due time on the locked row and is left out.
        """
        cap = limit if per_endpoint is None else per_endpoint
        busy = {e: n for e, n in (in_flight or {}).items() if n > 0}
        stmt = _PER_ENDPOINT_CLAIM.bindparams(
            now=now,
            limit=limit,
            cap=cap,
            busy_ids=list(busy),
            busy_n=list(busy.values()),
        )
        return list((await conn.execute(stmt)).scalars().all())

    async def _take(
        self,
        conn: AsyncConnection,
        ids: list[str],
        *,
        now: datetime,
        lease: timedelta,
        worker_id: str,
    ) -> list[ClaimedDelivery]:
        """Lease ``ids`` to ``worker_id`` and read what sending them needs (one transaction)."""
        d = DELIVERIES.c
        await conn.execute(
            update(DELIVERIES)
            .where(d.id.in_(ids))
            .values(next_attempt_at=now + lease, claimed_by=worker_id, updated_at=now)
        )
        e = ENDPOINTS.c
        rows = (
            await conn.execute(
                select(
                    d.id,
                    d.project_id,
                    d.endpoint_id,
                    d.event_id,
                    d.event_type,
                    d.attempt_count,
                    d.notification_id,
                    d.round_start,
                    d.force_send,
                    e.url,
                    e.secret_enc,
                    e.previous_secret_enc,
                    e.rotated_at,
                    e.auth_header_enc,
                    e.is_active,
                )
                .select_from(DELIVERIES.outerjoin(ENDPOINTS, e.id == d.endpoint_id))
                .where(d.id.in_(ids))
                .order_by(d.next_attempt_at)
            )
        ).all()
        notes = {
            r["id"]: r
            for r in (
                await conn.execute(
                    select(NOTIFICATIONS).where(
                        NOTIFICATIONS.c.id.in_([r.notification_id for r in rows])
                    )
                )
            )
            .mappings()
            .all()
        }
        return [
            ClaimedDelivery(
                delivery_id=r.id,
                project_id=r.project_id,
                endpoint_id=r.endpoint_id,
                event_id=r.event_id,
                event_type=r.event_type,
                attempt_number=r.attempt_count + 1,
                url=r.url or "",
                secret_enc=r.secret_enc or "",
                previous_secret_enc=r.previous_secret_enc,
                rotated_at=r.rotated_at,
                auth_header_enc=r.auth_header_enc,
                endpoint_active=bool(r.is_active),
                notification=notes.get(r.notification_id),
                round_start=r.round_start,
                force_send=bool(r.force_send),
            )
            for r in rows
        ]

    async def finish_without_attempt(
        self, delivery_id: str, *, status: str, reason: str, now: datetime
    ) -> None:
        """
        Close a claimed delivery that is not sent: ``skipped`` (consumed by polling
        first) or ``dead`` (endpoint disabled or deleted).
        """
        d = DELIVERIES.c
        async with self.write() as conn:
            await conn.execute(
                update(DELIVERIES)
                .where(d.id == delivery_id, d.status == PENDING)
                .values(
                    status=status,
                    next_attempt_at=None,
                    claimed_by=None,
                    last_error=reason,
                    updated_at=now,
                )
            )

    async def postpone(self, delivery_id: str, *, at: datetime, now: datetime) -> None:
        """Release a claimed delivery until ``at`` without counting an attempt."""
        d = DELIVERIES.c
        async with self.write() as conn:
            await conn.execute(
                update(DELIVERIES)
                .where(d.id == delivery_id, d.status == PENDING)
                .values(next_attempt_at=at, claimed_by=None, updated_at=now)
            )

    async def record_attempt(
        self,
        claimed: ClaimedDelivery,
        attempt: AttemptRecord,
        step: NextState,
        *,
        now: datetime,
        disable_after: timedelta | None = None,
    ) -> EndpointDisabled | None:
        """
        Store ``attempt`` and apply ``step`` in one transaction.

        ``delivered`` also consumes the notification (status ``consumed``,
        ``consumed_at`` = ``now``) if it is still pending and this attempt finishes
        the delivery (one finished meanwhile, by another worker or a deleted
        endpoint, consumes nothing): a webhook 2xx and a polling consume are one
        state. A 2xx ends the endpoint's failing streak; a failure starts one
        (``failing_since``) unless one runs.
        ``disable_reason`` (410 Gone), or a streak that has lasted
        ``disable_after``, disables the endpoint and adds its project
        notification, once however many attempts race (the update is
        conditional on the endpoint being active).

        Returns:
            The disable this attempt caused, or ``None``.
        """
        found = await self.record_attempts(
            [RecordedAttempt(claimed, attempt, step, now)], disable_after=disable_after
        )
        return found[0]

    async def record_attempts(
        self, items: Sequence["RecordedAttempt"], *, disable_after: timedelta | None = None
    ) -> list[EndpointDisabled | None]:
        """
        :meth:`record_attempt` for many attempts in one transaction: all are stored or
        none is, in a handful of statements whatever their number (one insert, one
        update per kind of next state, one consume, the endpoints' streaks).

        The endpoints' health is applied in the order of ``items``, as separate calls
        would: a success clears a streak before a later failure starts a new one.

        Returns:
            Per item, in order, the disable it caused or ``None``.
        """
        if not items:
            return []
        if self._direct and all(
            item.step.delivered and item.attempt.status == SUCCESS for item in items
        ):
            await direct.write(self.engine, partial(_sqlite_successes, *_success_params(items)))
            return [None] * len(items)
        attempt_rows: list[dict[str, Any]] = []
        by_kind: dict[str, list[dict[str, Any]]] = {DELIVERED: [], PENDING: [], DEAD: []}
        consumed: list[dict[str, Any]] = []
        for item in items:
            claimed, attempt, step, now = item.claimed, item.attempt, item.step, item.now
            note = claimed.notification
            attempt_rows.append(
                {
                    "id": attempt.attempt_id,
                    "delivery_id": claimed.delivery_id,
                    "project_id": claimed.project_id,
                    "event_type": claimed.event_type,
                    "event_id": attempt.event_id,
                    "agent_id": None if note is None else note["agent_id"],
                    "user_id": None if note is None else note["user_id"],
                    "attempt_number": attempt.attempt_number,
                    "webhook_url": attempt.webhook_url,
                    "status": attempt.status,
                    "response_code": attempt.response_code,
                    "duration_ms": attempt.duration_ms,
                    "request_body": attempt.request_body,
                    "response_body": attempt.response_body,
                    "error_message": attempt.error_message,
                    "created_at": attempt.created_at,
                }
            )
            row = {
                "b_id": claimed.delivery_id,
                "b_count": attempt.attempt_number,
                "b_now": now,
                "b_error": None if step.delivered else step.reason,
            }
            if step.delivered:
                by_kind[DELIVERED].append(row)
                consumed.append(
                    {"b_id": claimed.event_id, "b_now": now, "b_via": claimed.delivery_id}
                )
            elif step.retry_at is not None:
                by_kind[PENDING].append(row | {"b_at": step.retry_at})
            else:
                by_kind[DEAD].append(row)
        common: dict[str, Any] = {
            "attempt_count": bindparam("b_count"),
            "claimed_by": None,
            "updated_at": bindparam("b_now"),
            "last_error": bindparam("b_error"),
        }
        next_state: dict[str, dict[str, Any]] = {
            DELIVERED: {
                "status": DELIVERED,
                "next_attempt_at": None,
                "delivered_at": bindparam("b_now"),
            },
            PENDING: {"next_attempt_at": bindparam("b_at")},
            DEAD: {"status": DEAD, "next_attempt_at": None},
        }
        # Rows are updated in key order, table by table, so two handlers replicas whose
        # batches touch the same notifications or endpoints take their row locks in one
        # order on PostgreSQL and cannot deadlock each other.
        for rows in by_kind.values():
            rows.sort(key=itemgetter("b_id"))
        consumed.sort(key=itemgetter("b_id"))
        async with self.write() as conn:
            await conn.execute(ATTEMPTS.insert(), attempt_rows)
            if self.single_writer:
                await self._finish_row_by_row(conn, by_kind, consumed, common, next_state)
            else:
                await self._finish_in_sets(conn, by_kind, consumed)
            found: list[EndpointDisabled | None] = [None] * len(items)
            by_endpoint: dict[str, list[int]] = {}
            for index, item in enumerate(items):
                by_endpoint.setdefault(item.claimed.endpoint_id, []).append(index)
            # Endpoints in key order; each one's attempts in the order of items, so a
            # success clears a streak before a later failure starts a new one. Successes
            # only clear a streak: the clears wait and go in one statement, flushed
            # before any failure's statements so the key order holds.
            clear: list[str] = []
            for endpoint_id in sorted(by_endpoint):
                for index in by_endpoint[endpoint_id]:
                    item = items[index]
                    if item.attempt.status == SUCCESS:
                        if not clear or clear[-1] != endpoint_id:
                            clear.append(endpoint_id)
                        continue
                    if clear:
                        await self._clear_streaks(conn, clear)
                        clear = []
                    found[index] = await self._endpoint_health(
                        conn, item.claimed, item.attempt, item.step, item.now, disable_after
                    )
            if clear:
                await self._clear_streaks(conn, clear)
        return found

    async def _finish_row_by_row(
        self,
        conn: AsyncConnection,
        by_kind: Mapping[str, list[dict[str, Any]]],
        consumed: list[dict[str, Any]],
        common: Mapping[str, Any],
        next_state: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """
        The deliveries' next states and the consumes of :meth:`record_attempts` as
        one ``executemany`` per statement (SQLite: one writer, and each row is a
        call on the driver's thread, not a round trip).
        """
        d, n = DELIVERIES.c, NOTIFICATIONS.c
        if consumed:
            # A 2xx consumes the notification only through a delivery this attempt
            # finishes: one finished meanwhile (dead after its endpoint was deleted,
            # delivered by another worker whose lease had ended) decides nothing
            # more. One writer: the delivery's status, read in this statement before
            # the deliveries are updated, cannot change before the commit.
            await conn.execute(
                update(NOTIFICATIONS)
                .where(n.id == bindparam("b_id"), n.status == "pending")
                .values(status="consumed", consumed_at=bindparam("b_now"))
                .where(
                    select(d.id).where(d.id == bindparam("b_via"), d.status == PENDING).exists()
                ),
                consumed,
            )
        for kind, rows in by_kind.items():
            if rows:
                # Guarded by the status: a delivery finished meanwhile is left alone.
                await conn.execute(
                    update(DELIVERIES)
                    .where(d.id == bindparam("b_id"), d.status == PENDING)
                    .values(**common, **next_state[kind]),
                    rows,
                )

    async def _finish_in_sets(
        self,
        conn: AsyncConnection,
        by_kind: Mapping[str, list[dict[str, Any]]],
        consumed: list[dict[str, Any]],
    ) -> None:
        """
        The deliveries' next states and the consumes of :meth:`record_attempts` in
        a few set-based statements (PostgreSQL), whatever the batch's size.

        Every row is locked first by primary key alone, in key order (deliveries,
        then notifications), so two handlers replicas whose batches share rows take
        their locks in one order and cannot deadlock; which of them is still
        ``pending`` is read under that lock, so the updates that follow join
        ``unnest`` arrays on the key alone. Measured in the end-to-end bench: the
        per-row ``executemany`` updates took about 65 ms a group of 95 (one bind and
        execution a row, under load), and the lock's read with the status as a
        parameter was planned generically on a burst's stale statistics as a scan of
        the due index (17-25 ms, some 8,000 rows read to lock 32); the statements
        here take 3-8 ms each, planned as primary-key probes.
        """
        d, n = DELIVERIES.c, NOTIFICATIONS.c
        ids = sorted(row["b_id"] for rows in by_kind.values() for row in rows)
        locked = await conn.execute(
            select(d.id, d.status)
            .where(d.id == any_(bindparam("ids", ids, type_=ARRAY(String))))
            .order_by(d.id)
            .with_for_update()
        )
        live = {row.id for row in locked if row.status == PENDING}
        still = set(live)  # pending as each kind's update is reached
        for kind, rows in by_kind.items():
            # A delivery finished meanwhile (another worker whose lease had ended,
            # an endpoint deleted) is left alone, as the row-by-row guard does. One
            # delivery twice in a batch (its lease ended while the first attempt was
            # in flight) ends as row by row: a retry is overwritten by a later one,
            # a finished delivery takes nothing more.
            keep: dict[str, dict[str, Any]] = {}
            for row in rows:
                if row["b_id"] in still and (kind == PENDING or row["b_id"] not in keep):
                    keep[row["b_id"]] = row
            rows = list(keep.values())
            if kind != PENDING:
                still -= keep.keys()
            if not rows:
                continue
            arrays: dict[str, tuple[ARRAY[Any], list[Any]]] = {
                "id": (ARRAY(String), [row["b_id"] for row in rows]),
                "n": (ARRAY(Integer), [row["b_count"] for row in rows]),
                "at_now": (ARRAY(UTCDateTime()), [row["b_now"] for row in rows]),
                "error": (ARRAY(Text), [row["b_error"] for row in rows]),
            }
            if kind == PENDING:
                arrays["retry_at"] = (ARRAY(UTCDateTime()), [row["b_at"] for row in rows])
            given = (
                func.unnest(
                    *(
                        bindparam(f"v_{name}", values, type_=t)
                        for name, (t, values) in arrays.items()
                    )
                )
                .table_valued(*arrays)
                .render_derived(name="given")
            )
            values: dict[str, Any] = {
                "attempt_count": given.c.n,
                "claimed_by": None,
                "updated_at": given.c.at_now,
                "last_error": given.c.error,
            }
            if kind == DELIVERED:
                values |= {
                    "status": DELIVERED,
                    "next_attempt_at": None,
                    "delivered_at": given.c.at_now,
                }
            elif kind == PENDING:
                values |= {"next_attempt_at": given.c.retry_at}
            else:
                values |= {"status": DEAD, "next_attempt_at": None}
            await conn.execute(update(DELIVERIES).where(d.id == given.c.id).values(**values))
        # A 2xx consumes the notification only through a delivery this transaction
        # finishes; a notification reached by two deliveries of the batch is consumed
        # once, at the first one's instant (the row-by-row update's second match
        # finds it consumed already).
        first: dict[str, datetime] = {}
        for row in consumed:
            if row["b_via"] in live:
                first.setdefault(row["b_id"], row["b_now"])
        if not first:
            return
        notes = sorted(first)
        pending = (
            await conn.execute(
                select(n.id, n.status)
                .where(n.id == any_(bindparam("ids", notes, type_=ARRAY(String))))
                .order_by(n.id)
                .with_for_update()
            )
        ).all()
        notes = [row.id for row in pending if row.status == "pending"]
        if not notes:
            return
        given = (
            func.unnest(
                bindparam("v_id", notes, type_=ARRAY(String)),
                bindparam("v_at", [first[i] for i in notes], type_=ARRAY(UTCDateTime())),
            )
            .table_valued("id", "at_now")
            .render_derived(name="given")
        )
        await conn.execute(
            update(NOTIFICATIONS)
            .where(n.id == given.c.id)
            .values(status="consumed", consumed_at=given.c.at_now)
        )

    async def _clear_streaks(self, conn: AsyncConnection, endpoint_ids: Sequence[str]) -> None:
        """End the failing streaks of ``endpoint_ids`` (a 2xx), in the caller's transaction."""
        e = ENDPOINTS.c
        await conn.execute(
            update(ENDPOINTS)
            # A disabled endpoint's streak is kept as it was when it was disabled:
            # it says where a recovery starts.
            .where(e.id.in_(endpoint_ids), e.failing_since.is_not(None), e.is_active.is_(True))
            .values(failing_since=None)
        )

    async def _endpoint_health(
        self,
        conn: AsyncConnection,
        claimed: ClaimedDelivery,
        attempt: AttemptRecord,
        step: NextState,
        now: datetime,
        disable_after: timedelta | None,
    ) -> EndpointDisabled | None:
        """
        A failed attempt's streak and disable, inside :meth:`record_attempts`'s
        transaction (a success only clears the streak: :meth:`_clear_streaks`).
        """
        e = ENDPOINTS.c
        mine = e.id == claimed.endpoint_id
        await conn.execute(
            update(ENDPOINTS)
            .where(mine, e.failing_since.is_(None), e.is_active.is_(True))
            .values(failing_since=now)
        )
        row = (
            (await conn.execute(select(ENDPOINTS).where(mine, e.is_active.is_(True))))
            .mappings()
            .one_or_none()
        )
        if row is None:
            return None
        since: datetime | None = row["failing_since"]
        if step.disable_reason is not None:
            reason = step.disable_reason
            # A 410 on an endpoint that was healthy until now: nothing failed before it.
            since = since if since is not None and since < now else None
        elif disable_after is not None and since is not None and now - since >= disable_after:
            reason = streak_reason(since, disable_after)
        else:
            return None
        changed = await conn.execute(
            update(ENDPOINTS)
            .where(mine, e.is_active.is_(True))
            .values(
                is_active=False,
                disabled_reason=reason,
                disabled_at=now,
                failing_since=since,
                updated_at=now,
            )
        )
        if not changed.rowcount:
            return None  # a concurrent attempt disabled it first, and said so
        notice = _disabled_notice(row, reason, now, since)
        await conn.execute(NOTIFICATIONS.insert().values(**notice))
        return EndpointDisabled(claimed.endpoint_id, reason, now, since, notice["id"])

    async def enable_endpoint(
        self, project_id: str, event_type: str, *, now: datetime
    ) -> Enabled | None:
        """
        Re-enable the endpoint (idempotent); ``None`` when nothing is registered.

        The answer carries when and why it had been disabled, so the caller can
        recover the messages since then. Its failing streak starts afresh.
        """
        e = ENDPOINTS.c
        scope = (*owned(ENDPOINTS, project_id), e.event_type == event_type)
        async with self.write() as conn:
            row = (await conn.execute(select(ENDPOINTS).where(*scope))).mappings().one_or_none()
            if row is None:
                return None
            if row["is_active"]:
                return Enabled(was_disabled=False)
            start = row["failing_since"] or row["disabled_at"]
            earliest = None
            if start is not None:
                # When the messages that failed since then were made: a recovery
                # selects messages by that instant.
                d, n = DELIVERIES.c, NOTIFICATIONS.c
                earliest = (
                    await conn.execute(
                        select(func.min(n.created_at))
                        .select_from(DELIVERIES.join(NOTIFICATIONS, n.id == d.notification_id))
                        .where(
                            d.endpoint_id == row["id"],
                            d.status != DELIVERED,
                            d.updated_at >= start,
                        )
                    )
                ).scalar()
            await conn.execute(
                update(ENDPOINTS)
                .where(*scope)
                .values(
                    is_active=True,
                    disabled_reason=None,
                    disabled_at=None,
                    failing_since=None,
                    updated_at=now,
                )
            )
        return Enabled(
            was_disabled=True,
            disabled_at=row["disabled_at"],
            disabled_reason=row["disabled_reason"],
            failing_since=row["failing_since"],
            earliest_undelivered=earliest,
        )

    async def release_claims(self, *, now: datetime, worker_id: str | None = None) -> int:
        """
        Make claimed deliveries due ``now``: those of ``worker_id``, or every claim
        when ``None`` (SQLite start-up: one handlers process, so any claim left is a
        killed one's, as the scheduler does with its claims).
        """
        d = DELIVERIES.c
        conds = [d.status == PENDING, d.claimed_by.is_not(None)]
        if worker_id is not None:
            conds.append(d.claimed_by == worker_id)
        async with self.write() as conn:
            result = await conn.execute(
                update(DELIVERIES)
                .where(*conds)
                .values(next_attempt_at=now, claimed_by=None, updated_at=now)
            )
        return int(result.rowcount or 0)

    # --- recovery (API) ------------------------------------------------------------

    async def _endpoint(self, conn: Any, project_id: str, event_type: str) -> str:
        e = ENDPOINTS.c
        row = (
            await conn.execute(
                select(e.id, e.is_active, e.disabled_reason).where(
                    *owned(ENDPOINTS, project_id), e.event_type == event_type
                )
            )
        ).first()
        if row is None:
            raise EndpointMissingError(event_type)
        if not row.is_active:
            raise EndpointDisabledError(row.disabled_reason)
        return str(row.id)

    async def resend(
        self, project_id: str, event_type: str, ident: str, *, now: datetime
    ) -> Requeued | None:
        """
        Send one message to the (project, event type) endpoint again, through the queue.

        ``ident`` is a delivery id, an ``attempt_id`` from the attempts list, or the
        message's event id (the ``webhook-id`` the receiver saw, the notification id).
        A finished delivery (delivered, dead or skipped) becomes pending now, with a
        fresh retry round and ``force_send`` (a consumed message is sent anyway); a
        pending one is left as it is (``queued`` False); an event id with no delivery
        to this endpoint yet gets one. Returns ``None`` when ``ident`` names nothing of
        this project and event type.

        Raises:
            EndpointMissingError: nothing is registered for the event type.
            EndpointDisabledError: the endpoint is disabled.
            MessageEndedError: the message can no longer be sent (past its deadline,
                or held back or replaced by a delivery policy): the worker would skip
                it, so nothing is queued.
        """
        d = DELIVERIES.c
        a = ATTEMPTS.c
        n = NOTIFICATIONS.c
        async with self.write() as conn:
            endpoint_id = await self._endpoint(conn, project_id, event_type)
            mine = and_(d.project_id == project_id, d.endpoint_id == endpoint_id)
            row = (
                await conn.execute(
                    select(d.id, d.event_id, d.status, d.notification_id).where(
                        mine,
                        d.id.in_(
                            select(a.delivery_id)
                            .where(*owned(ATTEMPTS, project_id), a.id == ident)
                            .scalar_subquery()
                        )
                        | (d.id == ident)
                        | (d.event_id == ident),
                    )
                )
            ).first()
            note = (
                await conn.execute(
                    select(n.status, n.expires_at).where(
                        *owned(NOTIFICATIONS, project_id),
                        n.id == (ident if row is None else row.notification_id),
                        n.event_type == event_type,
                        # A staged message is not the user's yet: it is not re-sent.
                        n.status != "staged",
                    )
                )
            ).first()
            if note is None:
                return None
            if note.status not in ("pending", "consumed"):
                raise MessageEndedError(note.status)
            if past_deadline(note.expires_at, now):
                raise MessageEndedError("expired")
            if row is None:
                delivery_id = new_id("whd")
                inserted = await insert_ignoring_duplicates(
                    conn,
                    DELIVERIES,
                    [
                        self._new_delivery(
                            delivery_id,
                            project_id,
                            endpoint_id,
                            ident,
                            event_type,
                            now=now,
                            force=True,
                        )
                    ],
                    unique=["notification_id", "endpoint_id"],
                )
                if not inserted:
                    # A concurrent call queued it first: report that delivery.
                    delivery_id = (
                        await conn.execute(select(d.id).where(mine, d.notification_id == ident))
                    ).scalar_one()
                return Requeued(delivery_id, ident, queued=bool(inserted))
            if row.status == PENDING:
                return Requeued(row.id, row.event_id, queued=False)
            result = await conn.execute(
                update(DELIVERIES)
                .where(d.id == row.id, d.status != PENDING)
                .values(
                    status=PENDING,
                    next_attempt_at=now,
                    claimed_by=None,
                    last_error=None,
                    round_start=d.attempt_count,
                    force_send=True,
                    updated_at=now,
                )
            )
        return Requeued(row.id, row.event_id, queued=bool(result.rowcount))

    async def recover(
        self, project_id: str, event_type: str, *, since: datetime, now: datetime
    ) -> Recovered:
        """
        Queue again every message of the event type created at or after ``since`` that
        the endpoint has not received and that is still pending (not consumed,
        expired or staged): its failed (dead) deliveries restart with a fresh retry
        round, and messages it never had a delivery for (created while it was
        disabled or unregistered) get one. Delivered, skipped and pending deliveries are
        left alone, so a repeated call queues nothing twice.

        Raises:
            EndpointMissingError: nothing is registered for the event type.
            EndpointDisabledError: the endpoint is disabled.
        """
        d = DELIVERIES.c
        n = NOTIFICATIONS.c
        async with self.write() as conn:
            endpoint_id = await self._endpoint(conn, project_id, event_type)
            wanted = select(n.id).where(
                *owned(NOTIFICATIONS, project_id),
                n.event_type == event_type,
                n.created_at >= since,
                n.status == "pending",
                # Past its deadline it is never sent: queued, the worker would skip it.
                live_at(now),
            )
            result = await conn.execute(
                update(DELIVERIES)
                .where(
                    d.endpoint_id == endpoint_id,
                    d.status == DEAD,
                    d.notification_id.in_(wanted.scalar_subquery()),
                )
                .values(
                    status=PENDING,
                    next_attempt_at=now,
                    claimed_by=None,
                    last_error=None,
                    round_start=d.attempt_count,
                    force_send=False,
                    updated_at=now,
                )
            )
            requeued = int(result.rowcount or 0)
            missing = (
                (
                    await conn.execute(
                        wanted.where(
                            ~select(d.id)
                            .where(d.notification_id == n.id, d.endpoint_id == endpoint_id)
                            .exists()
                        ).order_by(n.created_at)
                    )
                )
                .scalars()
                .all()
            )
            created = 0
            if missing:
                created = await insert_ignoring_duplicates(
                    conn,
                    DELIVERIES,
                    [
                        self._new_delivery(
                            new_id("whd"),
                            project_id,
                            endpoint_id,
                            note_id,
                            event_type,
                            now=now,
                            force=False,
                        )
                        for note_id in missing
                    ],
                    unique=["notification_id", "endpoint_id"],
                )
        return Recovered(requeued=requeued, created=created)

    @staticmethod
    def _new_delivery(
        delivery_id: str,
        project_id: str,
        endpoint_id: str,
        notification_id: str,
        event_type: str,
        *,
        now: datetime,
        force: bool,
    ) -> dict[str, Any]:
        return {
            "id": delivery_id,
            "project_id": project_id,
            "endpoint_id": endpoint_id,
            "notification_id": notification_id,
            "event_id": notification_id,
            "event_type": event_type,
            "status": PENDING,
            "attempt_count": 0,
            "next_attempt_at": now,
            "claimed_by": None,
            "last_error": None,
            "delivered_at": None,
            "created_at": now,
            "updated_at": now,
            "round_start": 0,
            "force_send": force,
        }

    async def deliveries(self, *, project_id: str | None = None) -> Sequence[RowMapping]:
        """Every delivery row (optionally one project's), oldest first: operators and tests."""
        d = DELIVERIES.c
        stmt = select(DELIVERIES).order_by(d.created_at, d.id)
        if project_id is not None:
            stmt = stmt.where(*owned(DELIVERIES, project_id))
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()
