"""
The scheduler shell: claim due schedules and wakeups, plan with pure code, and write the
fire rows, the schedules' new state and the outbox entries in one transaction.

DESIGN invariant 2: a fire row, its schedule's new ``next_fire_at`` and its outbox
entry commit together, so a crash at any moment either lost nothing or did it all;
the outbox relay (:mod:`delivery.outbox`) then publishes to JetStream with the fire
id as ``Nats-Msg-Id``. Hot paths are SQLAlchemy Core statements (DESIGN "Measured":
ORM ~3k rows/s, Core 60-80k). :meth:`Scheduler.tick` is bounded and returns what it
did (STYLE.md section 3); the periodic runner lives in :mod:`delivery.daemon`.
"""

import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import structlog
from sqlalchemy import Table, bindparam, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.bus.messages import FireCreated, WakeupDue
from delivery.bus.subjects import Subjects
from delivery.cadence import CompiledSchedule
from delivery.domain import TickResult, earliest
from delivery.planning import DEFAULT_MAX_SKIPS, SchedulePlan, fire_id, plan_schedule
from delivery.store import direct
from delivery.store.bulk import insert_outbox
from delivery.store.engine import any_row, is_sqlite, write_transaction
from delivery.store.schedules import compile_stored
from delivery.store.tables import FireRow, OutboxRow, ScheduleRow, WakeupRow

SCHEDULES: Table = ScheduleRow.__table__  # type: ignore[attr-defined]
FIRES: Table = FireRow.__table__  # type: ignore[attr-defined]
WAKEUPS: Table = WakeupRow.__table__  # type: ignore[attr-defined]
OUTBOX: Table = OutboxRow.__table__  # type: ignore[attr-defined]

log = structlog.get_logger(__name__)

_CLAIM_COLUMNS = (
    SCHEDULES.c.id,
    SCHEDULES.c.project_id,
    SCHEDULES.c.agent_id,
    SCHEDULES.c.user_id,
    SCHEDULES.c.cadence_json,
    SCHEDULES.c.active_window_json,
    SCHEDULES.c.timezone,
    SCHEDULES.c.starts_at,
    SCHEDULES.c.ends_at,
    SCHEDULES.c.anchor_at,
    SCHEDULES.c.updated_at,
    SCHEDULES.c.next_fire_at,
    SCHEDULES.c.last_fire_at,
    SCHEDULES.c.version,
)

# Statements are built once: SQLAlchemy caches their compiled form by identity.
_WRITE_SCHEDULE = (
    update(SCHEDULES)
    .where(SCHEDULES.c.id == bindparam("b_id"), SCHEDULES.c.version == bindparam("b_version"))
    .values(
        next_fire_at=bindparam("b_next_fire_at"),
        last_fire_at=bindparam("b_last_fire_at"),
        staged_fire_at=bindparam("b_staged_fire_at"),
        enabled=bindparam("b_enabled"),
        claimed_by=bindparam("b_claimed_by"),
        claimed_until=bindparam("b_claimed_until"),
    )
)


def new_instance_id() -> str:
    """A scheduler replica's claim token (``claimed_by``): unique per process start."""
    return f"sched_{secrets.token_hex(6)}"


class CompiledCache:
    """
    Compiled cadences, so a tick does not re-parse and re-validate every row.

    Two LRU levels. By (schedule id, version), as the issue asks: ``version`` is
    in the key, so an API PATCH (which bumps it) never serves a stale cadence.
    Below it, by content (cadence JSON, window JSON, zone): in a burst most
    schedules share a handful of cadences ("daily 09:00 Europe/Berlin"), and the
    compiled day rules and minute lists depend on nothing else. The per-row
    bounds (``starts_at``, ``ends_at``) and the ``interval_hours`` anchor are
    then set with :func:`dataclasses.replace`, computed exactly as
    ``compile_schedule`` does; ``tests/daemon/test_planning.py`` checks the two
    paths give equal objects.
    """

    def __init__(self, maxsize: int = 4096, templates: int = 1024) -> None:
        self.maxsize = maxsize
        self.template_size = templates
        self._items: OrderedDict[tuple[str, int], CompiledSchedule] = OrderedDict()
        self._templates: OrderedDict[tuple[str, str | None, str], CompiledSchedule] = OrderedDict()
        self.hits = 0
        self.template_hits = 0
        self.misses = 0

    def compiled(self, row: Row[Any]) -> CompiledSchedule:
        """The compiled cadence of a ``schedules`` row (id, version, cadence columns, bounds)."""
        key = (row.id, row.version)
        value = self._items.get(key)
        if value is not None:
            self.hits += 1
            self._items.move_to_end(key)
            return value
        content = (row.cadence_json, row.active_window_json, row.timezone)
        template = self._templates.get(content)
        if template is None:
            self.misses += 1
            value = compile_stored(row)
            _put(self._templates, content, value, self.template_size)
        else:
            self.template_hits += 1
            self._templates.move_to_end(content)
            value = replace(
                template,
                starts_at=row.starts_at,
                ends_at=row.ends_at,
                anchor=_anchor(row.starts_at, row.anchor_at),
            )
        self.put(key, value)
        return value

    def put(self, key: tuple[str, int], value: CompiledSchedule) -> None:
        """Remember ``value`` for (schedule id, version)."""
        _put(self._items, key, value, self.maxsize)

    def __len__(self) -> int:
        return len(self._items)


def _put(
    items: "OrderedDict[Any, CompiledSchedule]", key: Any, value: CompiledSchedule, maxsize: int
) -> None:
    if maxsize <= 0:
        return
    items[key] = value
    items.move_to_end(key)
    while len(items) > maxsize:
        items.popitem(last=False)


def _anchor(starts_at: datetime | None, created_at: datetime) -> datetime:
    # compile_schedule's anchor: starts_at, else the creation instant, rounded up
    # to the whole minute (delivery.cadence.compile).
    instant = (starts_at if starts_at is not None else created_at).astimezone(UTC)
    floor = instant.replace(second=0, microsecond=0)
    return floor if floor == instant else floor + timedelta(minutes=1)


def _latest(*instants: datetime | None) -> datetime | None:
    present = [i for i in instants if i is not None]
    return max(present) if present else None


def _insert_fires_sqlite(db: sqlite3.Connection, rows: list[dict[str, Any]]) -> set[str]:
    """Insert fire rows, ignoring existing (schedule_id, fire_at); the ids inserted."""
    if not rows:
        return set()
    # No RETURNING with executemany: what existed before is read in the same
    # transaction (a fire id is derived from its unique key).
    ids = [r["id"] for r in rows]
    had = {r["id"] for r in direct.select_in(db, FIRES, "id", ids, columns=["id"])}
    direct.insert_ignoring_duplicates(db, FIRES, rows, unique=["schedule_id", "fire_at"])
    return set(ids) - had


_AHEAD = timedelta(milliseconds=1)
"""How far before its fire instant a due fire's outbox entry is released (ordering only)."""

MAX_LOOKAHEAD = timedelta(seconds=59)
"""
Fires are on whole minutes, so a lookahead under a minute stages at most one
future fire per schedule: the one the API then shows as ``next_fire_at``.
"""


class Scheduler:
    """
    Turns due schedules and wakeups into fire rows and outbox entries.

    Several instances (processes or replicas) may run against one database:
    rows are claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (SQLite has
    one writer) and stamped with ``claimed_by`` / ``claimed_until``, so each due
    row is planned by exactly one instance; a claim whose holder died expires
    after ``lease``.

    Args:
        engine: the store's engine (schema present).
        subjects: the NATS subjects of this deployment (outbox rows name them).
        claim_batch: schedules (and wakeups) claimed per tick.
        max_lateness: missed fires older than this at catch-up are skipped.
        lease: how long a claim stays exclusive.
        instance_id: this replica's claim token; random by default.
        max_skips: bound on skip rows itemised per schedule per tick.
        cache_size: compiled cadences kept (LRU).
        on_outbox: called after a commit that wrote outbox rows (wakes the relay).
        lookahead: plan fires due within this much of ``now`` already (at most
            :data:`MAX_LOOKAHEAD`). The fire row and its outbox entry commit
            early and are published at once; the dispatcher composes a
            ``staged`` notification that the relay promotes at the fire
            instant (:mod:`delivery.store.staging`). This takes the scheduler's and
            the dispatcher's share of a burst off the burst's critical path.
            An API write that changes the schedule or its inventory item
            restages the fire, so the message still shows the state at the
            fire instant (:func:`delivery.store.staging.restage_fires`).

    Raises:
        ValueError: a lookahead outside [0, :data:`MAX_LOOKAHEAD`].
    """

    def __init__(
        self,
        engine: AsyncEngine,
        subjects: Subjects,
        *,
        claim_batch: int = 1000,
        max_lateness: timedelta = timedelta(hours=1),
        lease: timedelta = timedelta(seconds=30),
        instance_id: str | None = None,
        max_skips: int = DEFAULT_MAX_SKIPS,
        cache_size: int = 4096,
        on_outbox: Callable[[], None] | None = None,
        lookahead: timedelta = timedelta(0),
    ) -> None:
        if not timedelta(0) <= lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"lookahead must be within [0, {MAX_LOOKAHEAD}], got {lookahead}")
        self.lookahead = lookahead
        self.engine = engine
        self.subjects = subjects
        self.claim_batch = claim_batch
        self.max_lateness = max_lateness
        self.lease = lease
        self.instance_id = instance_id or new_instance_id()
        self.max_skips = max_skips
        self.cache = CompiledCache(cache_size)
        self.on_outbox = on_outbox
        self._sqlite = is_sqlite(str(engine.url))
        self._log = log.bind(scheduler=self.instance_id)

    # --- transactions -----------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with write_transaction(self.engine) as conn:
            yield conn

    def _insert(self, table: Table) -> Any:
        return sqlite_insert(table) if self._sqlite else pg_insert(table)

    # --- public -----------------------------------------------------------------

    async def release_claims(self, *, everyone: bool = False) -> int:
        """
        Clear claims so the rows are claimable again at once.

        On shutdown a replica releases its own claims. With ``everyone`` (only
        for the embedded single-writer SQLite, at start-up) all claims go: the
        process that held them is dead, and waiting for the lease would only
        add lateness after a crash (DESIGN invariant 3).

        Returns:
            Schedules and wakeups released.
        """
        released = 0
        async with self._write() as conn:
            for table in (SCHEDULES, WAKEUPS):
                stmt = update(table).where(table.c.claimed_by.is_not(None))
                if not everyone:
                    stmt = stmt.where(table.c.claimed_by == self.instance_id)
                result = await conn.execute(stmt.values(claimed_by=None, claimed_until=None))
                released += int(result.rowcount or 0)
        if released:
            self._log.info("claims_released", released=released, everyone=everyone)
        return released

    async def release_claims_quietly(self) -> None:
        """Release this replica's claims (on shutdown); the count is logged, not returned."""
        await self.release_claims()

    async def tick(self, now: datetime) -> TickResult:
        """
        One bounded pass: at most ``claim_batch`` schedules and ``claim_batch`` wakeups.

        For each claimed schedule the cadence ticks since it was last handled
        are planned (:func:`delivery.planning.plan_schedule`): fires within the
        max lateness are produced once each, older ones and active-window / DST
        skips are recorded with their reason. Then, in one transaction per
        batch: the version is checked and bumped (a schedule the API changed
        since the claim is dropped; the next tick recomputes it), fire rows are
        inserted (``ON CONFLICT DO NOTHING`` on (schedule_id, fire_at)), the
        schedule's ``next_fire_at`` / ``last_fire_at`` / ``enabled`` are written
        and its claim cleared, and one outbox row (``fire.created``, msg id =
        fire id) per inserted fire is queued.

        Args:
            now: the instant to plan for (aware UTC), from the injected clock.

        Returns:
            Counts and fire ids; ``more`` when a batch was full.
        """
        result = await self._tick_schedules(now)
        wakeups, wakeups_full = await self._tick_wakeups(now)
        result.wakeups = wakeups
        result.outbox += wakeups
        result.more = result.more or wakeups_full
        if result.outbox and self.on_outbox is not None:
            self.on_outbox()
        if result.claimed or result.wakeups:
            self._log.debug(
                "tick",
                claimed=result.claimed,
                fired=result.fired,
                skipped=result.skipped,
                stale=result.stale,
                conflicts=result.conflicts,
                wakeups=result.wakeups,
                more=result.more,
            )
        return result

    async def drain(self, now: datetime, *, max_ticks: int = 10_000) -> TickResult:
        """Tick at ``now`` until nothing more is due (or ``max_ticks``); the sum of the ticks."""
        total = TickResult()
        for _ in range(max_ticks):
            one = await self.tick(now)
            total.add(one)
            if not one.more:
                break
        return total

    # --- schedules --------------------------------------------------------------

    async def claim_schedules(self, now: datetime) -> Sequence[Row[Any]]:
        """
        Claim up to ``claim_batch`` due schedules for ``lease`` and return their rows.

        Due: enabled, ``next_fire_at <= now + lookahead``, and unclaimed or with an expired
        lease. The claim commits at once; :meth:`apply_schedules` writes the
        outcome later, checking that the API did not change the rows meanwhile.
        """
        due = (
            select(SCHEDULES.c.id)
            .where(
                SCHEDULES.c.enabled.is_(True),
                SCHEDULES.c.next_fire_at <= now + self.lookahead,
                or_(SCHEDULES.c.claimed_until.is_(None), SCHEDULES.c.claimed_until < now),
            )
            .order_by(SCHEDULES.c.next_fire_at)
            .limit(self.claim_batch)
        )
        if not await any_row(self.engine, due):
            return []
        stmt = (
            update(SCHEDULES)
            # Replicas skip each other's locked rows instead of queueing on them
            # (DESIGN "Deployment shapes"); SQLite ignores this (one writer).
            .where(SCHEDULES.c.id.in_(due.with_for_update(skip_locked=True).scalar_subquery()))
            .values(claimed_by=self.instance_id, claimed_until=now + self.lease)
            .returning(*_CLAIM_COLUMNS)
        )
        async with self._write() as conn:
            return (await conn.execute(stmt)).all()

    def _plan(self, row: Row[Any], now: datetime) -> tuple[CompiledSchedule, SchedulePlan] | None:
        try:
            compiled = self.cache.compiled(row)
            plan = plan_schedule(
                compiled,
                due_from=row.next_fire_at,
                # Ticks up to the last fire, or up to the API's last write (which
                # recomputed next_fire_at), are already accounted for.
                handled_until=_latest(row.last_fire_at, row.updated_at),
                # Planning as of now + lookahead stages the fires of that window;
                # the lateness cutoff stays at now - max_lateness.
                now=now + self.lookahead,
                max_lateness=self.max_lateness + self.lookahead,
                last_fire_at=row.last_fire_at,
                max_skips=self.max_skips,
            )
        except Exception:
            # A row the cadence engine rejects stays claimed until its lease ends,
            # so it is retried later without spinning; the tick goes on.
            self._log.exception("schedule_plan_failed", schedule_id=row.id, version=row.version)
            return None
        return compiled, plan

    async def _tick_schedules(self, now: datetime) -> TickResult:
        rows = await self.claim_schedules(now)
        result = await self.apply_schedules(rows, now)
        result.more = len(rows) >= self.claim_batch
        return result

    async def apply_schedules(self, rows: Sequence[Row[Any]], now: datetime) -> TickResult:
        """
        Plan claimed ``rows`` at ``now`` and write the outcome in one transaction.

        Args:
            rows: from :meth:`claim_schedules` (by this instance).
            now: the instant to plan for.

        Returns:
            What was written (``more`` is left false).
        """
        result = TickResult(claimed=len(rows))
        if not rows:
            return result
        planned: list[tuple[Row[Any], CompiledSchedule, SchedulePlan]] = []
        for row in rows:
            outcome = self._plan(row, now)
            if outcome is None:
                result.failed += 1
                continue
            planned.append((row, *outcome))
        if not planned:
            return result

        if self._sqlite:
            # One call to the driver's thread for the whole transaction
            # (delivery.store.direct.write): a burst's staging shares the writer
            # with the dispatcher composing ahead, and round trips through a busy
            # event loop while holding the lock idled the writer for both.
            kept = await direct.write(
                self.engine, partial(self._apply_sqlite, planned=planned, now=now, result=result)
            )
        else:
            kept = await self._apply_postgres(planned, now, result)
        if not kept:
            return result

        # After the commit: the next claim of each schedule sees version + 1, so
        # the compiled cadence is still valid under the new key.
        for row, compiled, plan in kept:
            self.cache.put((row.id, row.version + 1), compiled)
            if plan.disable:
                result.disabled += 1
                self._log.info("schedule_ended", schedule_id=row.id, ends_at=row.ends_at)
            if plan.missed or plan.truncated:
                self._log.warning(
                    "fires_missed",
                    schedule_id=row.id,
                    missed=plan.missed,
                    unitemised=plan.unitemised,
                    truncated=plan.truncated,
                    since=row.next_fire_at,
                )
        for fid in result.fire_ids:
            self._log.debug("fire_created", fire_id=fid)
        if result.conflicts:
            self._log.warning("fire_conflicts", conflicts=result.conflicts)
        return result

    def _kept(
        self,
        planned: list[tuple[Row[Any], CompiledSchedule, SchedulePlan]],
        bumped: Mapping[str, int],
        result: TickResult,
    ) -> tuple[list[tuple[Row[Any], CompiledSchedule, SchedulePlan]], list[str]]:
        """
        Split claimed plans by the versions the bump returned: a row whose version
        is not claimed + 1 was changed by the API after our claim, so its work is
        dropped and the next tick replans it from the new state.
        """
        kept = [p for p in planned if bumped.get(p[0].id) == p[0].version + 1]
        stale = [row.id for row, _, _ in planned if bumped.get(row.id) != row.version + 1]
        result.stale = len(stale)
        for schedule_id in stale:
            self._log.info("schedule_changed_during_tick", schedule_id=schedule_id)
        return kept, stale

    @staticmethod
    def _states(
        kept: list[tuple[Row[Any], CompiledSchedule, SchedulePlan]], now: datetime
    ) -> list[dict[str, Any]]:
        return [
            {
                "next_fire_at": plan.next_fire_at,
                "last_fire_at": plan.last_fire_at,
                # At most one fire lies ahead (MAX_LOOKAHEAD); the API shows it.
                "staged_fire_at": next((at for at in plan.fires if at > now), None),
                "enabled": not plan.disable,
                "claimed_by": None,
                "claimed_until": None,
                # The version we just set: belt and braces, the row is already locked.
                "id": row.id,
                "version": row.version + 1,
            }
            for row, _, plan in kept
        ]

    @staticmethod
    def _fire_rows(
        kept: list[tuple[Row[Any], CompiledSchedule, SchedulePlan]], now: datetime
    ) -> list[dict[str, Any]]:
        fire_rows: list[dict[str, Any]] = []
        for row, _, plan in kept:
            base = {
                "schedule_id": row.id,
                "project_id": row.project_id,
                "agent_id": row.agent_id,
                "user_id": row.user_id,
                "created_at": now,
            }
            fire_rows.extend(
                {
                    **base,
                    "id": fire_id(row.id, at),
                    "fire_at": at,
                    "status": "fired",
                    "skip_reason": None,
                }
                for at in plan.fires
            )
            fire_rows.extend(
                {
                    **base,
                    "id": fire_id(row.id, skip.fire_at),
                    "fire_at": skip.fire_at,
                    "status": "skipped",
                    "skip_reason": skip.reason,
                }
                for skip in plan.skips
            )
        return fire_rows

    def _outbox_rows(
        self,
        fire_rows: list[dict[str, Any]],
        inserted: set[str],
        now: datetime,
        result: TickResult,
    ) -> list[dict[str, Any]]:
        """One ``fire.created`` per inserted fire; counts the fires into ``result``."""
        outbox_rows: list[dict[str, Any]] = []
        subject = self.subjects.fire_created
        for fire in fire_rows:
            if fire["status"] != "fired":
                continue
            if fire["id"] not in inserted:
                result.conflicts += 1
                continue
            result.fire_ids.append(fire["id"])
            payload = FireCreated(
                fire_id=fire["id"], schedule_id=fire["schedule_id"], fire_at=fire["fire_at"]
            )
            if fire["fire_at"] > now:
                # The relay must run at the instant to promote the staged
                # notification the dispatcher composes meanwhile.
                result.next_release = earliest(result.next_release, fire["fire_at"])
            outbox_rows.append(
                {
                    "subject": subject,
                    "msg_id": fire["id"],
                    "payload": payload.model_dump_json(),
                    "created_at": now,
                    # Published at once, even when staged ahead: the dispatcher
                    # composes it during the lookahead (delivery.store.staging). A fire
                    # planned late sorts just before its instant, so the relay
                    # publishes it ahead of the notification.created entries
                    # that instant released (a burst's promoted messages).
                    "available_at": now if fire["fire_at"] > now else fire["fire_at"] - _AHEAD,
                }
            )
        result.fired = len(result.fire_ids)
        result.skipped = len(inserted) - result.fired
        # Counted from the rows, not rowcount: asyncpg's executemany rowcount is
        # not reliable, and each msg_id is a fire id inserted just before.
        result.outbox = len(outbox_rows)
        return outbox_rows

    def _apply_sqlite(
        self,
        db: sqlite3.Connection,
        *,
        planned: list[tuple[Row[Any], CompiledSchedule, SchedulePlan]],
        now: datetime,
        result: TickResult,
    ) -> list[tuple[Row[Any], CompiledSchedule, SchedulePlan]]:
        """:meth:`_apply_postgres` on SQLite's driver thread, inside one transaction."""
        ids = [row.id for row, _, _ in planned]
        bumped: dict[str, int] = {}
        for start in range(0, len(ids), direct.MAX_VARIABLES):
            chunk = ids[start : start + direct.MAX_VARIABLES]
            marks = ",".join("?" * len(chunk))
            cursor = db.execute(
                "UPDATE schedules SET version = version + 1 "  # noqa: S608 (marks only)
                f"WHERE id IN ({marks}) AND claimed_by = ? RETURNING id, version",
                (*chunk, self.instance_id),
            )
            bumped.update(cursor.fetchall())
        kept, stale = self._kept(planned, bumped, result)
        if stale:
            direct.update_in(
                db,
                SCHEDULES,
                "id",
                stale,
                {"claimed_by": None, "claimed_until": None},
                only_if={"claimed_by": self.instance_id},
            )
        if not kept:
            return kept
        direct.update_rows(db, SCHEDULES, self._states(kept, now), where=["id", "version"])
        fire_rows = self._fire_rows(kept, now)
        inserted = _insert_fires_sqlite(db, fire_rows)
        outbox_rows = self._outbox_rows(fire_rows, inserted, now, result)
        direct.insert_ignoring_duplicates(db, OUTBOX, outbox_rows, unique="msg_id")
        return kept

    async def _apply_postgres(
        self,
        planned: list[tuple[Row[Any], CompiledSchedule, SchedulePlan]],
        now: datetime,
        result: TickResult,
    ) -> list[tuple[Row[Any], CompiledSchedule, SchedulePlan]]:
        """Write the plans in one transaction; the plans kept (not changed since the claim)."""
        async with self._write() as conn:
            # The version bump comes first: it locks the rows (an API PATCH now
            # waits for this commit). It selects by primary key and returns the
            # new versions; bumping a stale row once more is harmless: a version
            # only has to change.
            bump = (
                update(SCHEDULES)
                .where(
                    SCHEDULES.c.id.in_([row.id for row, _, _ in planned]),
                    SCHEDULES.c.claimed_by == self.instance_id,
                )
                .values(version=SCHEDULES.c.version + 1)
                .returning(SCHEDULES.c.id, SCHEDULES.c.version)
            )
            bumped = {r.id: r.version for r in (await conn.execute(bump)).all()}
            kept, stale = self._kept(planned, bumped, result)
            if stale:
                # Give the changed rows back at once instead of at lease expiry.
                await conn.execute(
                    update(SCHEDULES)
                    .where(SCHEDULES.c.id.in_(stale), SCHEDULES.c.claimed_by == self.instance_id)
                    .values(claimed_by=None, claimed_until=None)
                )
            if not kept:
                return kept
            states = self._states(kept, now)
            await conn.execute(
                _WRITE_SCHEDULE, [{f"b_{k}": v for k, v in state.items()} for state in states]
            )
            fire_rows = self._fire_rows(kept, now)
            inserted = await self._insert_fires(conn, fire_rows)
            await insert_outbox(conn, self._outbox_rows(fire_rows, inserted, now, result))
        return kept

    async def _insert_fires(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> set[str]:
        """
        Insert fire rows, ignoring existing (schedule_id, fire_at); the ids inserted.
        PostgreSQL; SQLite inserts on the driver's thread (:func:`_insert_fires_sqlite`).
        """
        if not rows:
            return set()
        stmt = (
            pg_insert(FIRES)
            .on_conflict_do_nothing(index_elements=["schedule_id", "fire_at"])
            .returning(FIRES.c.id)
        )
        # executemany + RETURNING batches through SQLAlchemy's insertmanyvalues.
        return set((await conn.execute(stmt, rows)).scalars().all())

    # --- wakeups ----------------------------------------------------------------

    async def _tick_wakeups(self, now: datetime) -> tuple[int, bool]:
        """
        Claim pending wakeups due at ``now`` and queue one ``wakeup.due`` each.

        The wakeup stays ``pending`` (the dispatcher marks it executed when it
        creates the notification). The claim lasts ``lease``; if the wakeup is
        still pending after that, it is claimed again and its outbox row is
        re-armed (``sent_at`` cleared) so a message that never reached the
        dispatcher is sent again. JetStream dedupe and the notification's
        unique ``source_id`` absorb the repeat (DESIGN invariant 2).
        """
        due = (
            select(WAKEUPS.c.id)
            .where(
                WAKEUPS.c.status == "pending",
                WAKEUPS.c.scheduled_at <= now,
                or_(WAKEUPS.c.claimed_until.is_(None), WAKEUPS.c.claimed_until < now),
            )
            .order_by(WAKEUPS.c.scheduled_at)
            .limit(self.claim_batch)
        )
        if not await any_row(self.engine, due):
            return 0, False
        claim = (
            update(WAKEUPS)
            .where(WAKEUPS.c.id.in_(due.with_for_update(skip_locked=True).scalar_subquery()))
            .values(claimed_by=self.instance_id, claimed_until=now + self.lease)
            .returning(WAKEUPS.c.id, WAKEUPS.c.scheduled_at)
        )
        subject = self.subjects.wakeup_due
        async with self._write() as conn:
            rows = (await conn.execute(claim)).all()
            if not rows:
                return 0, False
            outbox = [
                {
                    "subject": subject,
                    "msg_id": row.id,
                    "payload": WakeupDue(
                        wakeup_id=row.id, fire_at=row.scheduled_at
                    ).model_dump_json(),
                    "created_at": now,
                    "available_at": now,
                    "sent_at": None,
                }
                for row in rows
            ]
            upsert = self._insert(OUTBOX)
            upsert = upsert.on_conflict_do_update(index_elements=["msg_id"], set_={"sent_at": None})
            await conn.execute(upsert, outbox)
        for row in rows:
            self._log.debug("wakeup_due", wakeup_id=row.id)
        return len(rows), len(rows) >= self.claim_batch
