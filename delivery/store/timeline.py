"""
The timeline's reads: one user's (or one schedule's) story from the tables that
record each fact, and the facts :func:`delivery.explain.explain` reasons over.

Every read filters on the caller's ``project_id`` first; each source is an index
range (``ix_*_timeline``, ``ix_*_owner``, ``ix_notifications_consumed``,
``uq_fires_schedule_fire_at``) read in key order and cut at ``limit + 1`` rows, so
a page costs a few short range scans however long the history is.
"""

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    String,
    and_,
    bindparam,
    case,
    cast,
    exists,
    literal,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.expression import Executable

from delivery.cadence import format_utc
from delivery.explain import ExplainFacts, FireFacts, MessageFacts, ScheduleFacts
from delivery.store.engine import read_connection
from delivery.store.tables import (
    CHANNEL_ATTEMPTS,
    CHANNEL_FALLBACKS,
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
from delivery.store.types import UTCDateTime
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


@dataclass(frozen=True, slots=True)
class Page:
    """Up to ``limit + 1`` events, and the zone for those without a schedule."""

    events: list[TimelineEvent]
    zone: UserZone


class TimelineStore(Protocol):
    """
    Reads for the timeline and the explanation; it never writes.

    Contract:

    * every method sees only ``scope.project_id``'s rows: another project's ids
      behave as unknown ones;
    * :meth:`page` returns at most ``limit + 1`` events (two round trips, however
      long the history), strictly after
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

    async def page(self, scope: Scope, query: PageQuery) -> "Page":
        """One page of the story (see the contract), with the user's default zone."""
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
fb_ = CHANNEL_FALLBACKS.c
ep_ = ENDPOINTS.c


def _keyset(
    at: Any, ref: Any, shape: "_Shape", binary: Callable[[Any], Any]
) -> tuple[list[ColumnElement[bool]], list[Any]]:
    """The range and keyset conditions of one source (bound parameters), and its ORDER BY."""
    ref = binary(ref)
    conds: list[ColumnElement[bool]] = [at >= _SINCE, at < _UNTIL]
    if shape.cursor:
        # >= on the id: a row may hold two events (an attempt and its dead letter)
        # and the first may be the cursor; after_cursor drops what is not after it.
        if shape.order is _DESC:
            conds.append(or_(at < _C_AT, and_(at == _C_AT, ref <= binary(_C_REF))))
        else:
            conds.append(or_(at > _C_AT, and_(at == _C_AT, ref >= binary(_C_REF))))
    order = [at.desc(), ref.desc()] if shape.order is _DESC else [at.asc(), ref.asc()]
    return conds, order


@dataclass(frozen=True, slots=True)
class _Shape:
    """What changes a page's statement (everything else is a bound parameter)."""

    scoped: bool
    order: Order
    cursor: bool


_SINCE = bindparam("since", type_=UTCDateTime())
_UNTIL = bindparam("until", type_=UTCDateTime())
_C_AT = bindparam("c_at", type_=UTCDateTime())
_C_REF = bindparam("c_ref", type_=String())
_ROWS = bindparam("rows", type_=Integer())
_MERGED = bindparam("merged", type_=Integer())


def _bound_owner(table_c: Any) -> list[ColumnElement[bool]]:
    return [
        table_c.project_id == bindparam("p", type_=String()),
        table_c.agent_id == bindparam("a", type_=String()),
        table_c.user_id == bindparam("u", type_=String()),
    ]


_SCHEDULE = bindparam("s", type_=String())


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
        postgres = engine.dialect.name == "postgresql"
        # Ids are compared byte by byte, as Python compares them: PostgreSQL's default
        # collation may order "_" or case differently, and a cursor must mean the
        # same position in both. SQLite compares bytes already.
        self._binary: Callable[[Any], Any] = (
            (lambda column: column.collate("C")) if postgres else (lambda column: column)
        )
        self._statements: dict[_Shape, Select[Any]] = {}
        self._reader = (
            engine
            if engine.dialect.name == "sqlite"
            else engine.execution_options(isolation_level="AUTOCOMMIT")
        )

    async def _all(self, stmt: Executable) -> Sequence[RowMapping]:
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
        return await self._zone(scope, await self._schedules(scope))

    async def _zone(self, scope: Scope, schedules: dict[str, RowMapping]) -> UserZone:
        """The most recently created schedule's zone; a deleted schedule's last; UTC."""
        latest = max(schedules.values(), key=lambda r: (r["created_at"], r["id"]), default=None)
        if latest is not None:
            return UserZone(latest["timezone"], "schedule", latest["id"])
        if scope.schedule_id is not None:
            gone = (
                select(c_.schedule_id, c_.timezone)
                .where(c_.schedule_id == scope.schedule_id, *_owner(c_, scope))
                .order_by(c_.changed_at.desc())
                .limit(1)
            )
            rows = await self._all(gone)
            if rows:
                return UserZone(rows[0]["timezone"], "schedule", rows[0]["schedule_id"])
        return UserZone("UTC", "utc")

    @staticmethod
    def _schedules_of(scope: Scope) -> Select[Any]:
        stmt = select(
            s_.id, s_.timezone, s_.active_window_json, s_.ends_at, s_.enabled, s_.created_at
        ).where(*_owner(s_, scope))
        if scope.schedule_id is not None:
            stmt = stmt.where(s_.id == scope.schedule_id)
        return stmt

    async def _schedules(self, scope: Scope) -> dict[str, RowMapping]:
        return {r["id"]: r for r in await self._all(self._schedules_of(scope))}

    @staticmethod
    def _notifications(scope: Scope) -> list[ColumnElement[bool]]:
        conds = _owner(n_, scope)
        if scope.schedule_id is not None:
            conds.append(n_.schedule_id == scope.schedule_id)
        return conds

    async def _zones_of_deleted(self, scope: Scope, ids: Iterable[str]) -> dict[str, str]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        stmt = select(c_.schedule_id, c_.timezone).where(
            c_.schedule_id.in_(wanted), *_owner(c_, scope)
        )
        return {r["schedule_id"]: r["timezone"] for r in await self._all(stmt)}

    # --- the page ---------------------------------------------------------------------

    async def page(self, scope: Scope, query: PageQuery) -> Page:
        # Two round trips whatever the history's length: the scope's schedules (zones,
        # windows, ends_at), then every source's next rows in one UNION ALL, merged
        # by the database. The statement is built once per shape and reused.
        shape = _Shape(scope.schedule_id is not None, query.order, query.after is not None)
        stmt = self._statements.get(shape)
        if stmt is None:
            stmt = self._statements[shape] = self._statement(shape)
        c_at, c_ref, _ = query.after if query.after is not None else (None, None, None)
        params = {
            "p": scope.project_id,
            "a": scope.agent_id,
            "u": scope.user_id,
            "s": scope.schedule_id,
            "since": query.since,
            "until": query.until,
            "c_at": c_at,
            "c_ref": c_ref,
            "rows": query.limit + 1,
            # +2: the cursor's own row may come back (the keyset is inclusive on the
            # id) and still leave limit + 1 after it.
            "merged": query.limit + 2,
        }
        async with read_connection(self._reader) as conn:
            found = (await conn.execute(self._schedules_of(scope))).mappings().all()
            rows = (await conn.execute(stmt, params)).mappings().all()
        schedules = {r["id"]: r for r in found}
        events = _ended(schedules, query)
        for r in rows:
            events += _EVENTS[r["src"]](r, schedules, query)
        zones = {sid: s["timezone"] for sid, s in schedules.items()}
        missing = {e.schedule_id for e in events if e.schedule_id and e.schedule_id not in zones}
        zones |= await self._zones_of_deleted(scope, (m for m in missing if m))
        chosen = [
            e if e.timezone or not e.schedule_id else _with_zone(e, zones.get(e.schedule_id))
            for e in events
            if query.since <= e.at < query.until and after_cursor(e.key, query.after, query.order)
        ]
        chosen.sort(key=lambda e: e.key, reverse=query.order is _DESC)
        zone = await self._zone(scope, schedules)
        return Page(chosen[: query.limit + 1], zone)

    def _statement(self, shape: _Shape) -> Select[Any]:
        merged = union_all(*self._sources(shape)).subquery()
        at, ref = merged.c.at, self._binary(merged.c.ref)
        order = [at.desc(), ref.desc()] if shape.order is _DESC else [at.asc(), ref.asc()]
        return select(merged).order_by(*order).limit(_MERGED)

    def _sources(self, shape: _Shape) -> list[Select[Any]]:
        """One capped, ordered select per source, all with the same columns."""
        mine = _bound_owner(n_) + ([n_.schedule_id == _SCHEDULE] if shape.scoped else [])
        sources: list[Select[Any]] = []

        def add(src: str, at: Any, ref: Any, base: Select[Any], **cols: Any) -> None:
            conds, order = _keyset(at, ref, shape, self._binary)
            stmt = base.add_columns(*_columns(src, at, ref, cols)).where(*conds)
            sources.append(select(stmt.order_by(*order).limit(_ROWS).subquery()))

        schedule_only = [c_.schedule_id == _SCHEDULE] if shape.scoped else []
        add(
            "change",
            c_.changed_at,
            c_.id,
            select().select_from(SCHEDULE_CHANGES).where(*_bound_owner(c_), *schedule_only),
            schedule_id=c_.schedule_id,
            s1=c_.kind,
            s2=c_.fields_json,
            s3=c_.timezone,
            n1=c_.version,
        )
        fires = (
            [f_.schedule_id == _SCHEDULE, f_.project_id == bindparam("p", type_=String())]
            if shape.scoped
            else _bound_owner(f_)
        )
        add(
            "fire",
            f_.fire_at,
            f_.id,
            select().select_from(FIRES).where(*fires),
            schedule_id=f_.schedule_id,
            s1=f_.status,
            s2=f_.skip_reason,
        )
        if not shape.scoped:
            add(
                "wakeup",
                w_.created_at,
                w_.id,
                select().select_from(WAKEUPS).where(*_bound_owner(w_)),
                s1=w_.status,
                s2=w_.check_type,
                t1=w_.scheduled_at,
            )
            add(
                "event",
                e_.created_at,
                e_.id,
                select().select_from(EVENTS).where(*_bound_owner(e_)),
                s1=e_.event_type,
                s2=e_.status,
            )
        add(
            "composed",
            n_.created_at,
            n_.id,
            select().select_from(NOTIFICATIONS).where(*mine),
            schedule_id=n_.schedule_id,
            s1=n_.status,
            s2=n_.error,
            s3=n_.source_type,
            s4=n_.source_id,
            s5=n_.status_reason,
            t1=n_.fire_at,
        )
        # delivered_at, not status: the probe must use the (notification_id, ...) key,
        # not the due index on status, which holds every delivered row.
        by_hook = exists().where(d_.notification_id == n_.id, d_.delivered_at.is_not(None))
        add(
            "consumed",
            n_.consumed_at,
            n_.id,
            select().select_from(NOTIFICATIONS).where(*mine, n_.consumed_at.is_not(None)),
            schedule_id=n_.schedule_id,
            n1=case((by_hook, 1), else_=0),
        )
        hook = WEBHOOK_ATTEMPTS.outerjoin(DELIVERIES, d_.id == a_.delivery_id).outerjoin(
            NOTIFICATIONS, n_.id == a_.event_id
        )
        hooks = _bound_owner(a_)
        if shape.scoped:
            hooks.append(n_.schedule_id == _SCHEDULE)
        add(
            "attempt",
            a_.created_at,
            a_.id,
            select().select_from(hook).where(*hooks),
            schedule_id=n_.schedule_id,
            s1=a_.status,
            s2=a_.webhook_url,
            s3=a_.error_message,
            s4=a_.event_id,
            s5=d_.status,
            n1=a_.attempt_number,
            n2=a_.response_code,
            n3=a_.duration_ms,
            n4=d_.attempt_count,
            t1=d_.next_attempt_at,
        )
        # A schedule's timeline keeps the channel rows of its own messages only.
        scoped_ids = select(n_.id).where(*mine).scalar_subquery() if shape.scoped else None
        channel = select().select_from(CHANNEL_ATTEMPTS).where(*_bound_owner(ch_))
        if scoped_ids is not None:
            channel = channel.where(ch_.notification_id.in_(scoped_ids))
        add(
            "channel",
            ch_.created_at,
            ch_.id,
            channel,
            s1=ch_.kind,
            s2=ch_.destination,
            s3=ch_.status,
            s4=ch_.reason,
            s5=ch_.notification_id,
            n1=ch_.attempt_number,
            n2=ch_.response_code,
            n3=ch_.duration_ms,
            t1=ch_.next_attempt_at,
        )
        fallback = select().select_from(CHANNEL_FALLBACKS).where(*_bound_owner(fb_))
        if scoped_ids is not None:
            fallback = fallback.where(fb_.notification_id.in_(scoped_ids))
        # One event per message, at its latest decision (the row's updated_at).
        add(
            "fallback",
            fb_.updated_at,
            fb_.notification_id,
            fallback,
            s1=fb_.status,
            s2=fb_.order_json,
            s3=fb_.decisions_json,
            n1=fb_.step,
            t1=fb_.next_attempt_at,
        )
        add(
            "endpoint",
            ep_.updated_at,
            ep_.id,
            select()
            .select_from(ENDPOINTS)
            .where(ep_.project_id == bindparam("p", type_=String()), ep_.is_active.is_(False)),
            s1=ep_.url,
            s2=ep_.event_type,
            s3=ep_.disabled_reason,
        )
        return sources

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
            n_.status_reason,
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
            select(d_.id, d_.status, d_.next_attempt_at, d_.claimed_by, d_.endpoint_id)
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
                disabled = await self._all(
                    select(ep_.disabled_reason, ep_.disabled_at).where(
                        ep_.id == delivery["endpoint_id"], ep_.is_active.is_(False)
                    )
                )
                if disabled:
                    facts["endpoint_disabled"] = (
                        disabled[0]["disabled_reason"] or "no reason recorded"
                    )
                    facts["endpoint_disabled_at"] = disabled[0]["disabled_at"]
        return MessageFacts(**facts)


_TEXT = ("schedule_id", "s1", "s2", "s3", "s4", "s5")
_INTS = ("n1", "n2", "n3", "n4")


def _columns(src: str, at: Any, ref: Any, given: dict[str, Any]) -> list[Any]:
    """The union's columns, in one order: typed NULLs where a source has no value."""
    cols: list[Any] = [
        literal(src, String()).label("src"),
        at.label("at"),
        cast(ref, String()).label("ref"),
    ]
    for name in _TEXT:
        value = given.get(name)
        cols.append(
            (cast(value, String()) if value is not None else cast(null(), String())).label(name)
        )
    for name in _INTS:
        value = given.get(name)
        cols.append((value if value is not None else cast(null(), Integer())).label(name))
    t1 = given.get("t1")
    cols.append((t1 if t1 is not None else cast(null(), UTCDateTime())).label("t1"))
    return cols


type _Convert = Callable[[RowMapping, dict[str, RowMapping], PageQuery], list[TimelineEvent]]


def _ended(schedules: dict[str, RowMapping], query: PageQuery) -> list[TimelineEvent]:
    # The scheduler disables a schedule once its ends_at passed; that write is not a
    # change row, the stored ends_at says when.
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


def _change(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    fields = json.loads(r["s2"] or "[]")
    said = f" ({', '.join(fields)})" if fields else ""
    return [
        TimelineEvent(
            at=r["at"],
            kind=_kind(r["s1"]),
            ref=r["ref"],
            summary=f"schedule {r['schedule_id']} {r['s1']}{said}",
            schedule_id=r["schedule_id"],
            timezone=r["s3"],
            detail={"fields": fields, "version": r["n1"]},
        )
    ]


def _fire(r: RowMapping, schedules: dict[str, RowMapping], q: PageQuery) -> list[TimelineEvent]:
    schedule = schedules.get(r["schedule_id"])
    zone = schedule["timezone"] if schedule else None
    if r["s1"] != "skipped":
        return [
            TimelineEvent(
                at=r["at"],
                kind=Kind.FIRE_FIRED,
                ref=r["ref"],
                summary=f"schedule {r['schedule_id']} fired",
                schedule_id=r["schedule_id"],
                timezone=zone,
            )
        ]
    window_json = schedule["active_window_json"] if schedule else None
    reason = r["s2"] or ""
    rule = skip_rule(
        reason, r["at"], zone, json.loads(window_json) if window_json else None, q.max_lateness
    )
    return [
        TimelineEvent(
            at=r["at"],
            kind=Kind.FIRE_SKIPPED,
            ref=r["ref"],
            summary=f"skipped: {rule}",
            schedule_id=r["schedule_id"],
            timezone=zone,
            detail={"reason": reason, "rule": rule},
        )
    ]


def _wakeup(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    return [
        TimelineEvent(
            at=r["at"],
            kind=Kind.WAKEUP_ACCEPTED,
            ref=r["ref"],
            summary=f"wakeup {r['ref']} accepted for {format_utc(r['t1'])} (now {r['s1']})",
            detail={"scheduled_at": format_utc(r["t1"]), "status": r["s1"], "check_type": r["s2"]},
        )
    ]


def _event(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    return [
        TimelineEvent(
            at=r["at"],
            kind=Kind.EVENT_ACCEPTED,
            ref=r["ref"],
            summary=f"trigger event {r['s1']} accepted (now {r['s2']})",
            detail={"event_type": r["s1"], "status": r["s2"]},
        )
    ]


POLICY_STATES: dict[tuple[str, str | None], str] = {
    ("suppressed", "attention_budget"): "suppressed/attention_budget: the user's attention "
    "budget was spent",
    ("suppressed", "quiet_hours"): "suppressed/quiet_hours: inside the user's quiet hours",
    ("superseded", "supersede_key"): "superseded by a newer message with the same supersede_key",
    ("superseded", "next_regular_fire"): "superseded: the quiet hours end after the "
    "schedule's next fire",
    ("expired", "deadline_passed"): "expired: its deadline passed before it was delivered",
    ("staged", "deferred_quiet_hours"): "deferred out of the user's quiet hours until its fire_at",
    ("pending", "deferred_quiet_hours"): "deferred out of the user's quiet hours, then "
    "pending in the queue",
}
"""How the timeline words a status a delivery policy set, with its reason."""


def _composed(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    status = r["s1"]
    detail = {
        "status": status,
        "source_type": r["s3"],
        "source_id": r["s4"],
        "fire_at": format_utc(r["t1"]),
    }
    reason = r["s5"]
    if reason is not None:
        # What a delivery policy decided, and why (delivery.policy).
        detail["reason"] = reason
    if status == "failed_generation":
        kind = Kind.NOTIFICATION_FAILED
        summary = f"composing message {r['ref']} failed: {r['s2'] or 'no error recorded'}"
        detail["error"] = r["s2"] or ""
    else:
        kind = Kind.NOTIFICATION_COMPOSED
        state = POLICY_STATES.get((status, reason)) or {
            "staged": "staged until its fire instant",
            "pending": "pending in the queue",
        }.get(status, f"now {status}")
        summary = f"message {r['ref']} composed ({state})"
    return [
        TimelineEvent(
            at=r["at"],
            kind=kind,
            ref=r["ref"],
            summary=summary,
            schedule_id=r["schedule_id"],
            detail=detail,
        )
    ]


def _consumed(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    by = "webhook" if r["n1"] else "poll"
    how = "by a webhook 2xx" if r["n1"] else "by a poll"
    return [
        TimelineEvent(
            at=r["at"],
            kind=Kind.NOTIFICATION_CONSUMED,
            ref=r["ref"],
            summary=f"message {r['ref']} consumed {how}",
            schedule_id=r["schedule_id"],
            detail={"by": by},
        )
    ]


def _attempt(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    url, number = r["s2"], r["n1"]
    last = r["n4"] is not None and r["n4"] == number
    answer = f"HTTP {r['n2']}" if r["n2"] else "no answer"
    detail: dict[str, Any] = {
        "endpoint": url,
        "attempt": number,
        "status": r["s1"],
        "response_code": r["n2"],
        "latency_ms": r["n3"],
        "message_id": r["s4"],
    }
    if r["s3"]:
        detail["error"] = r["s3"]
    then = ""
    if r["s1"] != "success" and r["s5"] is not None:
        if not last:
            then = "; retried"
        elif r["s5"] == "pending" and r["t1"] is not None:
            detail["next_retry_at"] = format_utc(r["t1"])
            then = f"; next retry at {format_utc(r['t1'])}"
    out = [
        TimelineEvent(
            at=r["at"],
            kind=Kind.WEBHOOK_ATTEMPT,
            ref=r["ref"],
            summary=f"webhook attempt {number} to {url}: {r['s1']}, {answer} in {r['n3']} ms{then}",
            schedule_id=r["schedule_id"],
            detail=detail,
        )
    ]
    if last and r["s5"] == "dead":
        out.append(
            TimelineEvent(
                at=r["at"],
                kind=Kind.WEBHOOK_DEAD_LETTERED,
                ref=r["ref"],
                summary=f"message {r['s4']} dead-lettered for {url} after {number} attempts: "
                "no more retries",
                schedule_id=r["schedule_id"],
                detail={"endpoint": url, "message_id": r["s4"]},
            )
        )
    return out


def _channel(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    detail: dict[str, Any] = {
        "channel": r["s1"],
        "destination": r["s2"],
        "attempt": r["n1"],
        "status": r["s3"],
        "response_code": r["n2"],
        "latency_ms": r["n3"],
        "message_id": r["s5"],
    }
    then = ""
    if r["t1"] is not None:
        detail["next_retry_at"] = format_utc(r["t1"])
        then = f"; next retry at {format_utc(r['t1'])}"
    why = f" ({r['s4']})" if r["s4"] else ""
    return [
        TimelineEvent(
            at=r["at"],
            kind=Kind.CHANNEL_ATTEMPT,
            ref=r["ref"],
            summary=f"{r['s1']} attempt {r['n1']} to {r['s2']}: {r['s3']}{why} in {r['n3']} ms"
            f"{then}",
            detail=detail,
        )
    ]


def _fallback(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    order = json.loads(r["s2"] or "[]")
    decisions = json.loads(r["s3"] or "[]")
    last = decisions[-1] if decisions else {"reason": "no decision recorded"}
    detail: dict[str, Any] = {
        "message_id": r["ref"],
        "status": r["s1"],
        "order": order,
        "channel": order[r["n1"]] if 0 <= (r["n1"] or 0) < len(order) else None,
        "decisions": decisions,
    }
    then = ""
    if r["t1"] is not None:
        detail["next_step_at"] = format_utc(r["t1"])
        then = f"; next step at {format_utc(r['t1'])}"
    return [
        TimelineEvent(
            at=r["at"],
            kind=Kind.CHANNEL_FALLBACK,
            ref=r["ref"],
            summary=f"channel fallback for message {r['ref']} ({' -> '.join(order)}), "
            f"{r['s1']}: {last['reason']}{then}",
            detail=detail,
        )
    ]


def _endpoint(r: RowMapping, _s: dict[str, RowMapping], _q: PageQuery) -> list[TimelineEvent]:
    return [
        TimelineEvent(
            at=r["at"],
            kind=Kind.ENDPOINT_DISABLED,
            ref=r["ref"],
            summary=f"webhook endpoint {r['s1']} ({r['s2']}) disabled: "
            f"{r['s3'] or 'no reason recorded'}",
            detail={"endpoint": r["s1"], "event_type": r["s2"]},
        )
    ]


_EVENTS: dict[str, _Convert] = {
    "change": _change,
    "fire": _fire,
    "wakeup": _wakeup,
    "event": _event,
    "composed": _composed,
    "consumed": _consumed,
    "attempt": _attempt,
    "channel": _channel,
    "fallback": _fallback,
    "endpoint": _endpoint,
}


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
