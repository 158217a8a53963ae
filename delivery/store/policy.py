"""
Delivery policy in the store: the project's policy and users' quiet hours (what the
API manages and the dispatcher reads), and the statements the dispatcher runs
inside its write transaction to apply the policy (:func:`spending`,
:func:`superseding`) and the expiry sweep (:func:`expire_due`).

The rules themselves are pure (:mod:`delivery.policy`); this module only reads
and writes rows.
"""

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog
from sqlalchemy import (
    ARRAY,
    String,
    and_,
    bindparam,
    delete,
    exists,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from delivery.policy import EXPIRED, NOT_COUNTED, SUPERSEDED, SUPERSEDED_BY_KEY, TTL
from delivery.store.common import StoreBase, insert_ignoring_duplicates
from delivery.store.direct import MAX_VARIABLES, marks, parse_instant, sqlite_instant
from delivery.store.engine import any_row, write_transaction
from delivery.store.staging import STAGED
from delivery.store.steps import Call, Steps
from delivery.store.tables import (
    ATTENTION,
    NOTIFICATIONS,
    OFFSETS,
    OUTBOX,
    POLICIES,
    QUIET_HOURS,
)

log = structlog.get_logger(__name__)

_n = NOTIFICATIONS.c
_q = QUIET_HOURS.c

type UserOf = tuple[str, str]
"""(project_id, user_id): whose attention (every agent of the project counts)."""

type PairOf = tuple[str, str, str]
"""(project_id, agent_id, user_id): an advanced pair, whose budget runs on its clock."""

LIVE = ("pending", STAGED)
"""Statuses a policy may still change: not yet read, or not yet visible."""


class PolicyRecords(Protocol):
    """
    What the API manages: one policy per project, quiet hours per (project, user).

    Invariants: every method filters on ``project_id``; a write replaces the
    whole value (a PUT), so a reader never sees half of two writes.
    """

    async def get_policy(self, project_id: str) -> str | None:
        """The project's stored policy JSON, or ``None`` (never set: every rule off)."""
        ...

    async def put_policy(self, project_id: str, policy_json: str, now: datetime) -> None:
        """Store the project's policy, replacing the previous one."""
        ...

    async def get_quiet_hours(self, project_id: str, user_id: str) -> RowMapping | None:
        """The user's quiet hours row, or ``None``."""
        ...

    async def put_quiet_hours(
        self, project_id: str, user_id: str, *, timezone: str, start: int, end: int, now: datetime
    ) -> None:
        """Set the user's quiet hours (minutes after local midnight), replacing any."""
        ...

    async def delete_quiet_hours(self, project_id: str, user_id: str) -> bool:
        """Remove the user's quiet hours; False when there were none."""
        ...


class PolicySource(Protocol):
    """What the dispatcher reads, once per batch."""

    async def project_policies(
        self, project_ids: Iterable[str]
    ) -> dict[str, tuple[str | None, bool]]:
        """
        Each project's policy JSON (``None``: never set) and whether any of its
        users has quiet hours, in one read.
        """
        ...

    async def quiet_hours_of(self, users: Iterable[UserOf]) -> dict[UserOf, RowMapping]:
        """The quiet hours of the users that have them, in one query per project."""
        ...


class PolicyStore(StoreBase):
    """:class:`PolicyRecords` and :class:`PolicySource` on SQLite and PostgreSQL."""

    async def get_policy(self, project_id: str) -> str | None:
        """See :meth:`PolicyRecords.get_policy`."""
        stmt = select(POLICIES.c.policy_json).where(POLICIES.c.project_id == project_id)
        async with self.read() as conn:
            value: str | None = (await conn.execute(stmt)).scalar_one_or_none()
        return value

    async def put_policy(self, project_id: str, policy_json: str, now: datetime) -> None:
        """See :meth:`PolicyRecords.put_policy`; two concurrent PUTs leave one of them."""
        row = {"project_id": project_id, "policy_json": policy_json, "updated_at": now}
        async with self.write() as conn:
            await _upsert(conn, POLICIES, row, ("project_id",))

    async def get_quiet_hours(self, project_id: str, user_id: str) -> RowMapping | None:
        """See :meth:`PolicyRecords.get_quiet_hours`."""
        stmt = select(QUIET_HOURS).where(_q.project_id == project_id, _q.user_id == user_id)
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().one_or_none()

    async def put_quiet_hours(
        self, project_id: str, user_id: str, *, timezone: str, start: int, end: int, now: datetime
    ) -> None:
        """See :meth:`PolicyRecords.put_quiet_hours`."""
        row = {
            "project_id": project_id,
            "user_id": user_id,
            "timezone": timezone,
            "start_minute": start,
            "end_minute": end,
            "updated_at": now,
        }
        async with self.write() as conn:
            await _upsert(conn, QUIET_HOURS, row, ("project_id", "user_id"))

    async def delete_quiet_hours(self, project_id: str, user_id: str) -> bool:
        """See :meth:`PolicyRecords.delete_quiet_hours`."""
        stmt = delete(QUIET_HOURS).where(_q.project_id == project_id, _q.user_id == user_id)
        async with self.write() as conn:
            return bool((await conn.execute(stmt)).rowcount)

    async def project_policies(
        self, project_ids: Iterable[str]
    ) -> dict[str, tuple[str | None, bool]]:
        """See :meth:`PolicySource.project_policies`."""
        ids = sorted(set(project_ids))
        out: dict[str, tuple[str | None, bool]] = dict.fromkeys(ids, (None, False))
        if not ids:
            return out
        quiet = select(_q.project_id).where(_q.project_id.in_(ids)).distinct()
        stmt = select(POLICIES.c.project_id, POLICIES.c.policy_json).where(
            POLICIES.c.project_id.in_(ids)
        )
        async with self.read() as conn:
            texts: dict[str, str] = dict((await conn.execute(stmt)).all())
            having = set((await conn.execute(quiet)).scalars())
        return {p: (texts.get(p), p in having) for p in ids}

    async def quiet_hours_of(self, users: Iterable[UserOf]) -> dict[UserOf, RowMapping]:
        """See :meth:`PolicySource.quiet_hours_of`."""
        by_project: dict[str, set[str]] = {}
        for project_id, user_id in users:
            by_project.setdefault(project_id, set()).add(user_id)
        out: dict[UserOf, RowMapping] = {}
        async with self.read() as conn:
            for project_id, user_ids in sorted(by_project.items()):
                ordered = sorted(user_ids)
                for i in range(0, len(ordered), MAX_VARIABLES):
                    stmt = select(QUIET_HOURS).where(
                        _q.project_id == project_id, _q.user_id.in_(ordered[i : i + MAX_VARIABLES])
                    )
                    for row in (await conn.execute(stmt)).mappings():
                        out[(project_id, row["user_id"])] = row
        return out


async def _upsert(
    conn: AsyncConnection, table: Any, row: Mapping[str, Any], key: Sequence[str]
) -> None:
    """Replace ``row`` by its ``key`` columns, inside the caller's transaction."""
    where = [table.c[k] == row[k] for k in key]
    changes = {k: v for k, v in row.items() if k not in key}
    if (await conn.execute(update(table).where(*where).values(changes))).rowcount:
        return
    if not await insert_ignoring_duplicates(conn, table, [row], unique=key):
        # A concurrent first write won the insert: this later one replaces it.
        await conn.execute(update(table).where(*where).values(changes))


# --- inside the dispatcher's write transaction ---------------------------------------


def spending(
    windows: Mapping[str, int], users: Sequence[UserOf], now: datetime
) -> Steps[dict[UserOf, int]]:
    """
    Lock each user's attention counter and count the messages that spent their
    budget in the project's rolling window: ``{(project, user): used}``.

    Only messages dated in real time count: those of a pair whose clock is advanced
    (``clock_offsets``) are dated on that clock and counted by :func:`pair_spent`.

    On PostgreSQL the counter rows are upserted in key order (``INSERT ... ON
    CONFLICT DO UPDATE`` takes each row's lock, held to the commit), so a second
    dispatcher deciding for the same user waits here and then, READ COMMITTED,
    counts the first one's committed messages. On SQLite the transaction already
    holds the database's single write lock (``BEGIN IMMEDIATE``).

    Args:
        windows: project id -> its budget window in seconds.
        users: the users to decide for (each once).
        now: the decision's instant.
    """
    keys = sorted(set(users))
    if not keys:
        return {}
    used: dict[UserOf, int] = yield Call(
        lambda db: _count_direct(db, windows, keys, now),
        lambda conn: _count_core(conn, windows, keys, now),
    )
    return used


def _grouped(keys: Sequence[UserOf]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for project_id, user_id in keys:
        out.setdefault(project_id, []).append(user_id)
    return out


_NOT_COUNTED_SQL = ",".join(f"'{s}'" for s in NOT_COUNTED)
_REAL_TIME_SQL = (
    "NOT EXISTS (SELECT 1 FROM clock_offsets o WHERE o.project_id = notifications.project_id "
    "AND o.agent_id = notifications.agent_id AND o.user_id = notifications.user_id)"
)
"""A message not of an advanced pair (dated in real time); as :data:`_REAL_TIME` in Core."""
_NOT_AHEAD_SQL = f"(created_at <= ? OR status = '{STAGED}')"
"""
Dated at or before the decision, or held (a held message still counts). A pair whose
clock was reset keeps its messages dated on the old clock, possibly days ahead of real
now: without this bound each of them would spend every real-time window until then.
"""


def _not_ahead(until: Any) -> ColumnElement[bool]:
    """:data:`_NOT_AHEAD_SQL` in Core."""
    return or_(_n.created_at <= until, _n.status == STAGED)


_REAL_TIME = ~exists().where(
    OFFSETS.c.project_id == _n.project_id,
    OFFSETS.c.agent_id == _n.agent_id,
    OFFSETS.c.user_id == _n.user_id,
)


def _count_direct(
    db: sqlite3.Connection, windows: Mapping[str, int], keys: Sequence[UserOf], now: datetime
) -> dict[UserOf, int]:
    used: dict[UserOf, int] = dict.fromkeys(keys, 0)
    for project_id, user_ids in _grouped(keys).items():
        since = sqlite_instant(now - timedelta(seconds=windows[project_id]))
        for i in range(0, len(user_ids), MAX_VARIABLES):
            chunk = user_ids[i : i + MAX_VARIABLES]
            placeholders = marks(len(chunk))
            rows = db.execute(
                "SELECT user_id, COUNT(*) FROM notifications WHERE project_id = ? "  # noqa: S608 - only marks interpolated
                f"AND user_id IN ({placeholders}) AND created_at > ? "
                f"AND status NOT IN ({_NOT_COUNTED_SQL}) AND {_REAL_TIME_SQL} "
                f"AND {_NOT_AHEAD_SQL} GROUP BY user_id",
                (project_id, *chunk, since, sqlite_instant(now)),
            ).fetchall()
            for user_id, count in rows:
                used[(project_id, user_id)] = int(count)
    return used


def _pg_statements() -> tuple[Any, Any]:
    """
    PostgreSQL's lock and count, built once (SQLAlchemy caches a statement's
    compiled form by identity; built per batch, compiling them cost more than
    running them).
    """
    lock = pg_insert(ATTENTION)
    lock = lock.on_conflict_do_update(
        index_elements=["project_id", "user_id"], set_={"touched_at": lock.excluded.touched_at}
    )
    # One index probe per user (ix_notifications_attention), whatever the table's
    # statistics say: in a burst they are stale, and an IN list over the project
    # was planned as a scan of all its recent messages, per batch.
    users = (
        func.unnest(bindparam("users", type_=ARRAY(String)))
        .table_valued("user_id")
        .render_derived(name="asking")
    )
    recent = (
        select(func.count())
        .where(
            _n.project_id == bindparam("project_id"),
            _n.user_id == users.c.user_id,
            _n.created_at > bindparam("since", type_=_n.created_at.type),
            _n.status.not_in(NOT_COUNTED),
            _REAL_TIME,
            _not_ahead(bindparam("until", type_=_n.created_at.type)),
        )
        .scalar_subquery()
    )
    return lock, select(users.c.user_id, recent)


_PG_LOCK, _PG_COUNT = _pg_statements()


async def _count_core(
    conn: AsyncConnection, windows: Mapping[str, int], keys: Sequence[UserOf], now: datetime
) -> dict[UserOf, int]:
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        # executemany keeps the key order, so replicas lock users in one order.
        await conn.execute(
            _PG_LOCK, [{"project_id": p, "user_id": u, "touched_at": now} for p, u in keys]
        )
    used: dict[UserOf, int] = dict.fromkeys(keys, 0)
    for project_id, user_ids in _grouped(keys).items():
        since = now - timedelta(seconds=windows[project_id])
        if postgres:
            result = await conn.execute(
                _PG_COUNT,
                {"users": user_ids, "project_id": project_id, "since": since, "until": now},
            )
        else:
            result = await conn.execute(
                select(_n.user_id, func.count())
                .where(
                    _n.project_id == project_id,
                    _n.user_id.in_(user_ids),
                    _n.created_at > since,
                    _n.status.not_in(NOT_COUNTED),
                    _REAL_TIME,
                    _not_ahead(now),
                )
                .group_by(_n.user_id)
            )
        for user_id, count in result.all():
            if count:
                used[(project_id, user_id)] = int(count)
    return used


def pair_spent(since: Mapping[PairOf, datetime]) -> Steps[dict[PairOf, list[datetime]]]:
    """
    The instants (on the pair's clock) of each advanced pair's messages that spent a
    unit of its budget, dated after ``since[pair]``: an advanced pair's budget counts
    its own messages on its own clock (:func:`delivery.policy.allot_rolling`). The
    caller holds the users' counter rows (:func:`spending`).
    """
    if not since:
        return {}
    found: dict[PairOf, list[datetime]] = yield Call(
        lambda db: _pair_spent_direct(db, since),
        lambda conn: _pair_spent_core(conn, since),
    )
    return found


def _pair_spent_direct(
    db: sqlite3.Connection, since: Mapping[PairOf, datetime]
) -> dict[PairOf, list[datetime]]:
    out: dict[PairOf, list[datetime]] = {}
    for pair, start in sorted(since.items()):
        rows = db.execute(
            "SELECT created_at FROM notifications WHERE project_id = ? AND agent_id = ? "  # noqa: S608 - constants only
            f"AND user_id = ? AND created_at > ? AND status NOT IN ({_NOT_COUNTED_SQL})",
            (*pair, sqlite_instant(start)),
        ).fetchall()
        out[pair] = [parse_instant(t) for (t,) in rows]
    return out


async def _pair_spent_core(
    conn: AsyncConnection, since: Mapping[PairOf, datetime]
) -> dict[PairOf, list[datetime]]:
    out: dict[PairOf, list[datetime]] = {}
    for (project_id, agent_id, user_id), start in sorted(since.items()):
        result = await conn.execute(
            select(_n.created_at).where(
                _n.project_id == project_id,
                _n.agent_id == agent_id,
                _n.user_id == user_id,
                _n.created_at > start,
                _n.status.not_in(NOT_COUNTED),
            )
        )
        out[(project_id, agent_id, user_id)] = list(result.scalars())
    return out


def superseding(rows: Sequence[Mapping[str, Any]]) -> Steps[int]:
    """
    Mark superseded every live message of the same user and ``supersede_key`` as
    each row of ``rows`` (the newer ones, about to be inserted), other than itself.
    Their unsent outbox entries go too. Returns the messages superseded.
    """
    keyed = [r for r in rows if r.get("supersede_key") and r["status"] in LIVE]
    if not keyed:
        return 0
    changed: int = yield Call(
        lambda db: _supersede_direct(db, keyed),
        lambda conn: _supersede_core(conn, keyed),
    )
    return changed


def _supersede_direct(db: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    changed = 0
    for r in rows:
        found = [
            nid
            for (nid,) in db.execute(
                "SELECT id FROM notifications WHERE project_id = ? AND user_id = ? "
                "AND supersede_key = ? AND status IN (?, ?) AND id != ?",
                (r["project_id"], r["user_id"], r["supersede_key"], *LIVE, r["id"]),
            ).fetchall()
        ]
        for nid in found:
            db.execute(
                "UPDATE notifications SET status = ?, status_reason = ? WHERE id = ?",
                (SUPERSEDED, SUPERSEDED_BY_KEY, nid),
            )
            db.execute("DELETE FROM outbox WHERE msg_id = ? AND sent_at IS NULL", (nid,))
        changed += len(found)
    return changed


async def _supersede_core(conn: AsyncConnection, rows: Sequence[Mapping[str, Any]]) -> int:
    changed = 0
    for r in rows:
        found = list(
            (
                await conn.execute(
                    update(NOTIFICATIONS)
                    .where(
                        _n.project_id == r["project_id"],
                        _n.user_id == r["user_id"],
                        _n.supersede_key == r["supersede_key"],
                        _n.status.in_(LIVE),
                        _n.id != r["id"],
                    )
                    .values(status=SUPERSEDED, status_reason=SUPERSEDED_BY_KEY)
                    .returning(_n.id)
                )
            ).scalars()
        )
        if found:
            await conn.execute(
                delete(OUTBOX).where(OUTBOX.c.msg_id.in_(found), OUTBOX.c.sent_at.is_(None))
            )
        changed += len(found)
    return changed


# --- the expiry sweep -------------------------------------------------------------------

_LIVE_DEADLINE = "expires_at IS NOT NULL AND status IN ('pending', 'staged')"


EXPIRY_BATCH = 1000
"""Messages expired per sweep transaction."""


async def expire_due(engine: AsyncEngine, now: datetime, *, limit: int = EXPIRY_BATCH) -> list[str]:
    """
    Move up to ``limit`` pending (or staged) notifications whose deadline has passed
    to ``expired`` and drop their unsent outbox entries; the ids moved.

    Idempotent and safe on every replica: the ``UPDATE ... WHERE status IN (...)``
    changes each row once.
    """
    # Spelt as the partial index's predicate, literally, so PostgreSQL uses it.
    due = and_(text(_LIVE_DEADLINE), _n.expires_at <= now)
    # Probe first: on SQLite a write transaction queues for the one writer even
    # when it would change nothing, and the sweep runs every few seconds.
    if not await any_row(engine, select(_n.id).where(due)):
        return []
    async with write_transaction(engine) as conn:
        ids = list((await conn.execute(select(_n.id).where(due).limit(limit))).scalars())
        if not ids:
            return []
        expired = list(
            (
                await conn.execute(
                    update(NOTIFICATIONS)
                    .where(_n.id.in_(ids), _n.status.in_(LIVE))
                    .values(status=EXPIRED, status_reason=TTL)
                    .returning(_n.id)
                )
            ).scalars()
        )
        if expired:
            await conn.execute(
                delete(OUTBOX).where(OUTBOX.c.msg_id.in_(expired), OUTBOX.c.sent_at.is_(None))
            )
    if expired:
        log.info("notifications_expired", expired=len(expired))
    return expired
