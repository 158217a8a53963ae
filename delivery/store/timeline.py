"""
The timeline's reads: one user's (or one schedule's) story from the tables that
record each fact, and the facts :func:`delivery.explain.explain` reasons over.

Every read filters on the caller's ``project_id`` first; each source is an index
range (``ix_*_timeline``, ``ix_*_owner``, ``ix_notifications_consumed``,
``uq_fires_schedule_fire_at``) read in key order and cut at ``limit + 1`` rows, so
a page costs a few short range scans however long the history is.
"""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.cadence import format_utc
from delivery.explain import ExplainFacts, FireFacts, MessageFacts, ScheduleFacts
from delivery.store.engine import read_connection
from delivery.store.tables import (
    CHANNEL_ATTEMPTS,
    DELIVERIES,
    ENDPOINTS,
    EVENTS,
    FIRES,
    NOTIFICATIONS,
    PROJECTS,
    SCHEDULE_CHANGES,
    SCHEDULES,
    WAKEUPS,
    WEBHOOK_ATTEMPTS,
)
from delivery.timeline import EventKey, Kind, Order, TimelineEvent, after_cursor, skip_rule


@dataclass(frozen=True, slots=True)
class Scope:
    """Whose story: one (project, agent, user), optionally narrowed to one schedule."""

    project_id: str
    agent_id: str
    user_id: str
    schedule_id: str | None = None


@dataclass(frozen=True, slots=True)
class PageQuery:
    """
    One page: events with ``since <= at < until`` after ``after`` in ``order``.

    ``now`` decides which ``ends_at`` have passed; ``max_lateness`` words the
    missed-fire rule.
    """

    since: datetime
    until: datetime
    after: EventKey | None
    order: Order
    limit: int
    now: datetime
    max_lateness: timedelta


@dataclass(frozen=True, slots=True)
class UserZone:
    """The zone events without a schedule are shown in, and where it came from."""

    name: str
    source: str
    """``schedule`` (the user's most recently created one) or ``utc`` (none)."""
    schedule_id: str | None = None


class TimelineStore(Protocol):
    """
    Reads for the timeline and the explanation; it never writes.

    Contract:

    * every method sees only ``scope.project_id``'s rows: another project's ids
      behave as unknown ones;
    * :meth:`page` returns at most ``limit + 1`` events, strictly after
      ``query.after`` in ``query.order``, in that order, by the total order
      :attr:`delivery.timeline.TimelineEvent.key`: following the last returned
      key pages through every event exactly once (the extra one only says a
      next page exists);
    * :meth:`schedule_known` is true for a schedule of the scope's user that
      exists or existed (its deletion is in the history);
    * :meth:`explain_facts` returns the facts within ``window`` of ``at``.
    """

    async def schedule_known(self, scope: Scope) -> bool:
        """Whether ``scope.schedule_id`` is (or was) a schedule of the scope's user."""
        ...

    async def user_zone(self, scope: Scope) -> UserZone:
        """The zone for events that have no schedule of their own."""
        ...

    async def page(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        """One page of the story (see the contract)."""
        ...

    async def explain_facts(
        self,
        scope: Scope,
        *,
        at: datetime,
        window: timedelta,
        now: datetime,
        max_lateness: timedelta,
    ) -> ExplainFacts:
        """The schedules, fires and messages around ``at``."""
        ...


_DESC = Order.DESC

s_ = SCHEDULES.c
c_ = SCHEDULE_CHANGES.c
f_ = FIRES.c
n_ = NOTIFICATIONS.c
w_ = WAKEUPS.c
e_ = EVENTS.c
a_ = WEBHOOK_ATTEMPTS.c
d_ = DELIVERIES.c
ch_ = CHANNEL_ATTEMPTS.c
ep_ = ENDPOINTS.c


def _keyset(at: Any, ref: Any, query: PageQuery) -> tuple[list[ColumnElement[bool]], list[Any]]:
    """The range and keyset conditions of one source, and its ORDER BY."""
    conds: list[ColumnElement[bool]] = [at >= query.since, at < query.until]
    if query.after is not None:
        c_at, c_ref, _ = query.after
        # >= on the id: a row may hold two events (an attempt and its dead letter)
        # and the first may be the cursor; after_cursor drops what is not after it.
        if query.order is _DESC:
            conds.append(or_(at < c_at, and_(at == c_at, ref <= c_ref)))
        else:
            conds.append(or_(at > c_at, and_(at == c_at, ref >= c_ref)))
    order = [at.desc(), ref.desc()] if query.order is _DESC else [at.asc(), ref.asc()]
    return conds, order


def _owner(table_c: Any, scope: Scope) -> list[ColumnElement[bool]]:
    return [
        table_c.project_id == scope.project_id,
        table_c.agent_id == scope.agent_id,
        table_c.user_id == scope.user_id,
    ]


def _kind(change: str) -> Kind:
    return {
        "created": Kind.SCHEDULE_CREATED,
        "disabled": Kind.SCHEDULE_DISABLED,
        "enabled": Kind.SCHEDULE_ENABLED,
        "deleted": Kind.SCHEDULE_DELETED,
    }.get(change, Kind.SCHEDULE_UPDATED)


class SqlTimelineStore:
    """:class:`TimelineStore` over one engine (SQLite or PostgreSQL, the same statements)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reader = (
            engine
            if engine.dialect.name == "sqlite"
            else engine.execution_options(isolation_level="AUTOCOMMIT")
        )

    async def _all(self, stmt: Select[Any]) -> Sequence[RowMapping]:
        async with read_connection(self._reader) as conn:
            rows: Sequence[RowMapping] = (await conn.execute(stmt)).mappings().all()
        return rows

    # --- scope ------------------------------------------------------------------------

    async def projects(self) -> list[tuple[str, str]]:
        """Every project as (id, name), by name: the CLI resolves ``--project`` with it."""
        rows = await self._all(select(PROJECTS.c.id, PROJECTS.c.name).order_by(PROJECTS.c.name))
        return [(r["id"], r["name"]) for r in rows]

    async def schedule_known(self, scope: Scope) -> bool:
        sid = scope.schedule_id
        if sid is None:
            return True
        live = select(s_.id).where(s_.id == sid, *_owner(s_, scope))
        if await self._all(live):
            return True
        past = select(c_.id).where(c_.schedule_id == sid, *_owner(c_, scope)).limit(1)
        return bool(await self._all(past))

    async def user_zone(self, scope: Scope) -> UserZone:
        latest = (
            select(s_.id, s_.timezone)
            .where(*_owner(s_, scope))
            .order_by(s_.created_at.desc(), s_.id.desc())
            .limit(1)
        )
        if scope.schedule_id is not None:
            latest = latest.where(s_.id == scope.schedule_id)
        rows = await self._all(latest)
        if not rows and scope.schedule_id is not None:
            gone = (
                select(c_.schedule_id.label("id"), c_.timezone)
                .where(c_.schedule_id == scope.schedule_id, *_owner(c_, scope))
                .order_by(c_.changed_at.desc())
                .limit(1)
            )
            rows = await self._all(gone)
        if rows:
            return UserZone(rows[0]["timezone"], "schedule", rows[0]["id"])
        return UserZone("UTC", "utc")

    async def _schedules(self, scope: Scope) -> dict[str, RowMapping]:
        stmt = select(s_.id, s_.timezone, s_.active_window_json, s_.ends_at, s_.enabled).where(
            *_owner(s_, scope)
        )
        if scope.schedule_id is not None:
            stmt = stmt.where(s_.id == scope.schedule_id)
        return {r["id"]: r for r in await self._all(stmt)}

    async def _zones_of_deleted(self, scope: Scope, ids: Iterable[str]) -> dict[str, str]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        stmt = select(c_.schedule_id, c_.timezone).where(
            c_.schedule_id.in_(wanted), *_owner(c_, scope)
        )
        return {r["schedule_id"]: r["timezone"] for r in await self._all(stmt)}

    # --- the page ---------------------------------------------------------------------

    async def page(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        schedules = await self._schedules(scope)
        events: list[TimelineEvent] = []
        events += self._ended(schedules, query)
        events += await self._changes(scope, query)
        events += await self._fires(scope, query, schedules)
        if scope.schedule_id is None:
            events += await self._wakeups(scope, query)
            events += await self._trigger_events(scope, query)
        events += await self._composed(scope, query)
        events += await self._consumed(scope, query)
        events += await self._webhook_attempts(scope, query)
        events += await self._channel_attempts(scope, query)
        events += await self._endpoints_disabled(scope, query)
        missing = {
            e.schedule_id for e in events if e.schedule_id and e.schedule_id not in schedules
        }
        zones = {sid: r["timezone"] for sid, r in schedules.items()}
        zones |= await self._zones_of_deleted(scope, (m for m in missing if m))
        chosen = [
            e if e.timezone or not e.schedule_id else _with_zone(e, zones.get(e.schedule_id))
            for e in events
            if query.since <= e.at < query.until and after_cursor(e.key, query.after, query.order)
        ]
        chosen.sort(key=lambda e: e.key, reverse=query.order is _DESC)
        return chosen[: query.limit + 1]

    def _ended(self, schedules: dict[str, RowMapping], query: PageQuery) -> list[TimelineEvent]:
        return [
            TimelineEvent(
                at=r["ends_at"],
                kind=Kind.SCHEDULE_ENDED,
                ref=sid,
                summary=f"schedule {sid} reached its ends_at and no longer fires",
                schedule_id=sid,
                timezone=r["timezone"],
                detail={"ends_at": format_utc(r["ends_at"])},
            )
            for sid, r in schedules.items()
            if r["ends_at"] is not None and r["ends_at"] <= query.now
        ]

    async def _changes(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        conds, order = _keyset(c_.changed_at, c_.id, query)
        stmt = select(SCHEDULE_CHANGES).where(*_owner(c_, scope), *conds)
        if scope.schedule_id is not None:
            stmt = stmt.where(c_.schedule_id == scope.schedule_id)
        rows = await self._all(stmt.order_by(*order).limit(query.limit + 1))
        out = []
        for r in rows:
            kind = _kind(r["kind"])
            fields = json.loads(r["fields_json"])
            said = f" ({', '.join(fields)})" if fields else ""
            out.append(
                TimelineEvent(
                    at=r["changed_at"],
                    kind=kind,
                    ref=r["id"],
                    summary=f"schedule {r['schedule_id']} {r['kind']}{said}",
                    schedule_id=r["schedule_id"],
                    timezone=r["timezone"],
                    detail={"fields": fields, "version": r["version"]},
                )
            )
        return out

    async def _fires(
        self, scope: Scope, query: PageQuery, schedules: dict[str, RowMapping]
    ) -> list[TimelineEvent]:
        conds, order = _keyset(f_.fire_at, f_.id, query)
        stmt = select(f_.id, f_.schedule_id, f_.fire_at, f_.status, f_.skip_reason)
        if scope.schedule_id is not None:
            stmt = stmt.where(
                f_.schedule_id == scope.schedule_id, f_.project_id == scope.project_id, *conds
            )
        else:
            stmt = stmt.where(*_owner(f_, scope), *conds)
        rows = await self._all(stmt.order_by(*order).limit(query.limit + 1))
        out = []
        for r in rows:
            schedule = schedules.get(r["schedule_id"])
            zone = schedule["timezone"] if schedule else None
            if r["status"] == "skipped":
                window = (
                    json.loads(schedule["active_window_json"])
                    if schedule and schedule["active_window_json"]
                    else None
                )
                reason = r["skip_reason"] or ""
                rule = skip_rule(reason, r["fire_at"], zone, window, query.max_lateness)
                out.append(
                    TimelineEvent(
                        at=r["fire_at"],
                        kind=Kind.FIRE_SKIPPED,
                        ref=r["id"],
                        summary=f"skipped: {rule}",
                        schedule_id=r["schedule_id"],
                        timezone=zone,
                        detail={"reason": reason, "rule": rule},
                    )
                )
            else:
                out.append(
                    TimelineEvent(
                        at=r["fire_at"],
                        kind=Kind.FIRE_FIRED,
                        ref=r["id"],
                        summary=f"schedule {r['schedule_id']} fired",
                        schedule_id=r["schedule_id"],
                        timezone=zone,
                    )
                )
        return out

    async def _wakeups(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        conds, order = _keyset(w_.created_at, w_.id, query)
        stmt = (
            select(w_.id, w_.created_at, w_.scheduled_at, w_.status, w_.check_type)
            .where(*_owner(w_, scope), *conds)
            .order_by(*order)
            .limit(query.limit + 1)
        )
        return [
            TimelineEvent(
                at=r["created_at"],
                kind=Kind.WAKEUP_ACCEPTED,
                ref=r["id"],
                summary=f"wakeup {r['id']} accepted for {format_utc(r['scheduled_at'])} "
                f"(now {r['status']})",
                detail={
                    "scheduled_at": format_utc(r["scheduled_at"]),
                    "status": r["status"],
                    "check_type": r["check_type"],
                },
            )
            for r in await self._all(stmt)
        ]

    async def _trigger_events(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        conds, order = _keyset(e_.created_at, e_.id, query)
        stmt = (
            select(e_.id, e_.created_at, e_.event_type, e_.status)
            .where(*_owner(e_, scope), *conds)
            .order_by(*order)
            .limit(query.limit + 1)
        )
        return [
            TimelineEvent(
                at=r["created_at"],
                kind=Kind.EVENT_ACCEPTED,
                ref=r["id"],
                summary=f"trigger event {r['event_type']} accepted (now {r['status']})",
                detail={"event_type": r["event_type"], "status": r["status"]},
            )
            for r in await self._all(stmt)
        ]

    def _notifications(self, scope: Scope) -> list[ColumnElement[bool]]:
        conds = _owner(n_, scope)
        if scope.schedule_id is not None:
            conds.append(n_.schedule_id == scope.schedule_id)
        return conds

    async def _composed(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        conds, order = _keyset(n_.created_at, n_.id, query)
        stmt = (
            select(
                n_.id,
                n_.created_at,
                n_.status,
                n_.error,
                n_.source_type,
                n_.source_id,
                n_.schedule_id,
                n_.fire_at,
                n_.check_type,
            )
            .where(*self._notifications(scope), *conds)
            .order_by(*order)
            .limit(query.limit + 1)
        )
        out = []
        for r in await self._all(stmt):
            detail = {
                "status": r["status"],
                "source_type": r["source_type"],
                "source_id": r["source_id"],
                "fire_at": format_utc(r["fire_at"]),
            }
            if r["status"] == "failed_generation":
                kind = Kind.NOTIFICATION_FAILED
                summary = f"composing message {r['id']} failed: {r['error'] or 'no error recorded'}"
                detail["error"] = r["error"] or ""
            else:
                kind = Kind.NOTIFICATION_COMPOSED
                state = {
                    "staged": "staged until its fire instant",
                    "pending": "pending in the queue",
                }.get(r["status"], f"now {r['status']}")
                summary = f"message {r['id']} composed ({state})"
            out.append(
                TimelineEvent(
                    at=r["created_at"],
                    kind=kind,
                    ref=r["id"],
                    summary=summary,
                    schedule_id=r["schedule_id"],
                    detail=detail,
                )
            )
        return out

    async def _consumed(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        conds, order = _keyset(n_.consumed_at, n_.id, query)
        stmt = (
            select(n_.id, n_.consumed_at, n_.schedule_id)
            .where(*self._notifications(scope), n_.consumed_at.is_not(None), *conds)
            .order_by(*order)
            .limit(query.limit + 1)
        )
        rows = await self._all(stmt)
        if not rows:
            return []
        by_hook = {
            r["notification_id"]
            for r in await self._all(
                select(d_.notification_id).where(
                    d_.notification_id.in_([r["id"] for r in rows]), d_.status == "delivered"
                )
            )
        }
        return [
            TimelineEvent(
                at=r["consumed_at"],
                kind=Kind.NOTIFICATION_CONSUMED,
                ref=r["id"],
                summary=f"message {r['id']} consumed "
                + ("by a webhook 2xx" if r["id"] in by_hook else "by a poll"),
                schedule_id=r["schedule_id"],
                detail={"by": "webhook" if r["id"] in by_hook else "poll"},
            )
            for r in rows
        ]

    async def _webhook_attempts(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        conds, order = _keyset(a_.created_at, a_.id, query)
        stmt = select(
            a_.id,
            a_.delivery_id,
            a_.event_id,
            a_.attempt_number,
            a_.webhook_url,
            a_.status,
            a_.response_code,
            a_.duration_ms,
            a_.error_message,
            a_.created_at,
        ).where(*_owner(a_, scope), *conds)
        if scope.schedule_id is not None:
            mine = select(n_.id).where(*self._notifications(scope))
            stmt = stmt.where(a_.event_id.in_(mine.scalar_subquery()))
        rows = await self._all(stmt.order_by(*order).limit(query.limit + 1))
        if not rows:
            return []
        deliveries = {
            r["id"]: r
            for r in await self._all(
                select(d_.id, d_.status, d_.attempt_count, d_.next_attempt_at, d_.claimed_by).where(
                    d_.id.in_(sorted({r["delivery_id"] for r in rows}))
                )
            )
        }
        schedules = {
            r["id"]: r["schedule_id"]
            for r in await self._all(
                select(n_.id, n_.schedule_id).where(
                    n_.id.in_(sorted({r["event_id"] for r in rows}))
                )
            )
        }
        out = []
        for r in rows:
            delivery = deliveries.get(r["delivery_id"])
            last = delivery is not None and delivery["attempt_count"] == r["attempt_number"]
            answer = f"HTTP {r['response_code']}" if r["response_code"] else "no answer"
            detail: dict[str, Any] = {
                "endpoint": r["webhook_url"],
                "attempt": r["attempt_number"],
                "status": r["status"],
                "response_code": r["response_code"],
                "latency_ms": r["duration_ms"],
                "message_id": r["event_id"],
            }
            if r["error_message"]:
                detail["error"] = r["error_message"]
            then = ""
            if r["status"] != "success" and delivery is not None:
                if not last:
                    then = "; retried"
                elif delivery["status"] == "pending" and delivery["next_attempt_at"] is not None:
                    retry = delivery["next_attempt_at"]
                    detail["next_retry_at"] = format_utc(retry)
                    then = f"; next retry at {format_utc(retry)}"
            sid = schedules.get(r["event_id"])
            out.append(
                TimelineEvent(
                    at=r["created_at"],
                    kind=Kind.WEBHOOK_ATTEMPT,
                    ref=r["id"],
                    summary=f"webhook attempt {r['attempt_number']} to {r['webhook_url']}: "
                    f"{r['status']}, {answer} in {r['duration_ms']} ms{then}",
                    schedule_id=sid,
                    detail=detail,
                )
            )
            if last and delivery is not None and delivery["status"] == "dead":
                out.append(
                    TimelineEvent(
                        at=r["created_at"],
                        kind=Kind.WEBHOOK_DEAD_LETTERED,
                        ref=r["id"],
                        summary=f"message {r['event_id']} dead-lettered for {r['webhook_url']} "
                        f"after {r['attempt_number']} attempts: no more retries",
                        schedule_id=sid,
                        detail={"endpoint": r["webhook_url"], "message_id": r["event_id"]},
                    )
                )
        return out

    async def _channel_attempts(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        conds, order = _keyset(ch_.created_at, ch_.id, query)
        stmt = select(
            ch_.id,
            ch_.notification_id,
            ch_.kind,
            ch_.destination,
            ch_.status,
            ch_.reason,
            ch_.response_code,
            ch_.duration_ms,
            ch_.attempt_number,
            ch_.next_attempt_at,
            ch_.created_at,
        ).where(*_owner(ch_, scope), *conds)
        if scope.schedule_id is not None:
            mine = select(n_.id).where(*self._notifications(scope))
            stmt = stmt.where(ch_.notification_id.in_(mine.scalar_subquery()))
        out = []
        for r in await self._all(stmt.order_by(*order).limit(query.limit + 1)):
            detail: dict[str, Any] = {
                "channel": r["kind"],
                "destination": r["destination"],
                "attempt": r["attempt_number"],
                "status": r["status"],
                "response_code": r["response_code"],
                "latency_ms": r["duration_ms"],
                "message_id": r["notification_id"],
            }
            then = ""
            if r["next_attempt_at"] is not None:
                detail["next_retry_at"] = format_utc(r["next_attempt_at"])
                then = f"; next retry at {format_utc(r['next_attempt_at'])}"
            why = f" ({r['reason']})" if r["reason"] else ""
            out.append(
                TimelineEvent(
                    at=r["created_at"],
                    kind=Kind.CHANNEL_ATTEMPT,
                    ref=r["id"],
                    summary=f"{r['kind']} attempt {r['attempt_number']} to {r['destination']}: "
                    f"{r['status']}{why} in {r['duration_ms']} ms{then}",
                    detail=detail,
                )
            )
        return out

    async def _endpoints_disabled(self, scope: Scope, query: PageQuery) -> list[TimelineEvent]:
        stmt = select(ep_.id, ep_.url, ep_.event_type, ep_.disabled_reason, ep_.updated_at).where(
            ep_.project_id == scope.project_id, ep_.is_active.is_(False)
        )
        return [
            TimelineEvent(
                at=r["updated_at"],
                kind=Kind.ENDPOINT_DISABLED,
                ref=r["id"],
                summary=f"webhook endpoint {r['url']} ({r['event_type']}) disabled: "
                f"{r['disabled_reason'] or 'no reason recorded'}",
                detail={"endpoint": r["url"], "event_type": r["event_type"]},
            )
            for r in await self._all(stmt)
        ]

    # --- explain ----------------------------------------------------------------------

    async def explain_facts(
        self,
        scope: Scope,
        *,
        at: datetime,
        window: timedelta,
        now: datetime,
        max_lateness: timedelta,
    ) -> ExplainFacts:
        lo, hi = at - window, at + window
        stmt = select(SCHEDULES).where(*_owner(s_, scope))
        if scope.schedule_id is not None:
            stmt = stmt.where(s_.id == scope.schedule_id)
        schedule_rows = await self._all(stmt.order_by(s_.created_at, s_.id))
        changes = select(c_.schedule_id, c_.kind, c_.changed_at).where(*_owner(c_, scope))
        if scope.schedule_id is not None:
            changes = changes.where(c_.schedule_id == scope.schedule_id)
        history = await self._all(changes.order_by(c_.changed_at, c_.id))
        disabled_at: dict[str, datetime] = {}
        deleted: list[tuple[str, datetime]] = []
        for h in history:
            if h["kind"] == "disabled":
                disabled_at[h["schedule_id"]] = h["changed_at"]
            elif h["kind"] == "enabled":
                disabled_at.pop(h["schedule_id"], None)
            elif h["kind"] == "deleted":
                deleted.append((h["schedule_id"], h["changed_at"]))
        schedules = [
            ScheduleFacts(
                id=r["id"],
                timezone=r["timezone"],
                cadence_json=r["cadence_json"],
                active_window_json=r["active_window_json"],
                starts_at=r["starts_at"],
                ends_at=r["ends_at"],
                anchor_at=r["anchor_at"],
                enabled=bool(r["enabled"]),
                created_at=r["created_at"],
                disabled_at=None if r["enabled"] else disabled_at.get(r["id"]),
            )
            for r in schedule_rows
        ]
        fire_stmt = select(f_.id, f_.schedule_id, f_.fire_at, f_.status, f_.skip_reason).where(
            f_.project_id == scope.project_id, f_.fire_at >= lo, f_.fire_at <= hi
        )
        if scope.schedule_id is not None:
            fire_stmt = fire_stmt.where(f_.schedule_id == scope.schedule_id)
        else:
            fire_stmt = fire_stmt.where(*_owner(f_, scope))
        fires = [FireFacts(**dict(r)) for r in await self._all(fire_stmt)]
        # A message is created at its fire (advance-time, lookahead: up to a minute
        # before it) or later (a busy dispatcher); never long before.
        msg_stmt = select(
            n_.id,
            n_.source_id,
            n_.source_type,
            n_.schedule_id,
            n_.status,
            n_.fire_at,
            n_.created_at,
            n_.consumed_at,
            n_.error,
        ).where(
            *self._notifications(scope),
            n_.created_at >= lo - timedelta(minutes=2),
            n_.fire_at >= lo,
            n_.fire_at <= hi,
        )
        rows = await self._all(msg_stmt)
        messages = [await self._message(r) for r in rows]
        return ExplainFacts(
            at=at,
            window=window,
            now=now,
            max_lateness=max_lateness,
            schedules=schedules,
            fires=fires,
            messages=messages,
            deleted_schedules=deleted,
        )

    async def _message(self, r: RowMapping) -> MessageFacts:
        deliveries = await self._all(
            select(d_.id, d_.status, d_.next_attempt_at, d_.claimed_by)
            .where(d_.notification_id == r["id"])
            .order_by(d_.created_at)
        )
        facts: dict[str, Any] = dict(r)
        if any(d["status"] == "delivered" for d in deliveries):
            facts["consumed_by_webhook"] = True
        failing = [d for d in deliveries if d["status"] in ("pending", "dead")]
        if failing:
            attempts = await self._all(
                select(a_.response_code, a_.error_message, a_.created_at, a_.status)
                .where(a_.delivery_id.in_([d["id"] for d in failing]))
                .order_by(a_.seq.desc())
                .limit(1)
            )
            if attempts and attempts[0]["status"] != "success":
                last = attempts[0]
                delivery = failing[-1]
                facts |= {
                    "last_attempt_status": last["response_code"],
                    "last_attempt_error": last["error_message"],
                    "last_attempt_at": last["created_at"],
                    "next_attempt_at": (
                        delivery["next_attempt_at"]
                        if delivery["status"] == "pending" and not delivery["claimed_by"]
                        else None
                    ),
                    "dead_lettered": delivery["status"] == "dead",
                }
        return MessageFacts(**facts)


def _with_zone(event: TimelineEvent, zone: str | None) -> TimelineEvent:
    if zone is None:
        return event
    return TimelineEvent(
        at=event.at,
        kind=event.kind,
        ref=event.ref,
        summary=event.summary,
        schedule_id=event.schedule_id,
        timezone=zone,
        detail=event.detail,
    )
