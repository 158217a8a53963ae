"""
The scheduler shell: claim due schedules and wakeups, plan with pure code, and write the
fire rows, the schedules' new state and the outbox entries in one transaction.

A fire row, its schedule's new ``next_fire_at`` and its outbox
entry commit together, so a crash at any moment either lost nothing or did it all;
the outbox relay (:mod:`delivery.outbox`) then publishes to JetStream with the fire
id as ``Nats-Msg-Id``. Every statement lives in the store
(:mod:`delivery.store.schedules`); this shell reads through it, plans with
:mod:`delivery.planning` and hands the plans back to it. :meth:`Scheduler.tick` is
bounded and returns what it did; the periodic runner lives in
:mod:`delivery.daemon`.
"""

import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import Any

import structlog

from delivery import metrics
from delivery.bus.subjects import Subjects
from delivery.cadence import CompiledSchedule
from delivery.domain import TickResult
from delivery.handoff import Handoff
from delivery.planning import DEFAULT_MAX_SKIPS, SchedulePlan, plan_schedule
from delivery.store.engine import Engine
from delivery.store.schedules import (
    AppliedPlans,
    ClaimedSchedule,
    PlannedSchedule,
    SchedulerStore,
    ScheduleStore,
    compile_stored,
    defers,
    pair_offset,
)

log = structlog.get_logger(__name__)


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

    def compiled(self, row: ClaimedSchedule) -> CompiledSchedule:
        """The compiled cadence of a ``schedules`` row (id, version, cadence columns, bounds)."""
        key = (row.id, row.version)
        value = self._items.get(key)
        if value is not None:
            self.hits += 1
            self._items.move_to_end(key)
            return value
        # A deferring schedule compiles without its window (compile_stored).
        window = None if defers(row) else row.active_window_json
        content = (row.cadence_json, window, row.timezone)
        template = self._templates.get(content)
        if template is None:
            self.misses += 1
            value = compile_stored(row)
            _put(self._templates, content, value, self.template_size)
        else:
            self.template_hits += 1
            self._templates.move_to_end(content)
            value = _rebound(template, row.starts_at, row.ends_at, row.anchor_at)
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


_FIELDS = tuple(f.name for f in fields(CompiledSchedule))
_READ_ALL = attrgetter(*_FIELDS)
_BOUNDS = (_FIELDS.index("starts_at"), _FIELDS.index("ends_at"), _FIELDS.index("anchor"))


def _rebound(
    template: CompiledSchedule,
    starts_at: datetime | None,
    ends_at: datetime | None,
    created: datetime,
) -> CompiledSchedule:
    """
    ``template`` with a row's own bounds and anchor.

    What ``dataclasses.replace`` does, at a fifth of its cost (13 us of the 26 us a
    template hit took, once per fire in a burst): ``replace`` looks every field up
    by name again on each call; here the values are read in one ``attrgetter`` and
    passed to the constructor by position.
    """
    values = list(_READ_ALL(template))
    at_start, at_end, at_anchor = _BOUNDS
    values[at_start] = starts_at
    values[at_end] = ends_at
    values[at_anchor] = _anchor(starts_at, created)
    return CompiledSchedule(*values)


def _anchor(starts_at: datetime | None, created_at: datetime) -> datetime:
    # compile_schedule's anchor: starts_at, else the creation instant, rounded up
    # to the whole minute (delivery.cadence.compile).
    instant = (starts_at if starts_at is not None else created_at).astimezone(UTC)
    floor = instant.replace(second=0, microsecond=0)
    return floor if floor == instant else floor + timedelta(minutes=1)


def _latest(*instants: datetime | None) -> datetime | None:
    present = [i for i in instants if i is not None]
    return max(present) if present else None


MAX_LOOKAHEAD = timedelta(seconds=59)
"""
Fires are on whole minutes, so a lookahead under a minute stages at most one
future fire per schedule: the one the API then shows as ``next_fire_at``.
"""


class Scheduler:
    """
    Turns due schedules and wakeups into fire rows and outbox entries.

    Several instances (processes or replicas) may run against one database:
    the store claims rows for one instance at a time (``FOR UPDATE SKIP
    LOCKED`` on PostgreSQL, SQLite has one writer) and stamps them with
    ``claimed_by`` / ``claimed_until``, so each due row is planned by exactly
    one instance; a claim whose holder died expires after ``lease``.

    Args:
        engine: the store's engine (schema present); the scheduler's store
            (:class:`delivery.store.schedules.ScheduleStore`) is built on it.
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
        store: the store to use instead of a :class:`ScheduleStore` on ``engine``.
        handoff: the queue of the dispatcher in this process
            (:mod:`delivery.handoff`): the fires it has room for are handed to it
            after the commit, their outbox rows held for its grace; the others go
            through the relay as always.

    Raises:
        ValueError: a lookahead outside [0, :data:`MAX_LOOKAHEAD`].
    """

    def __init__(
        self,
        engine: Engine,
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
        store: SchedulerStore | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        if not timedelta(0) <= lookahead <= MAX_LOOKAHEAD:
            raise ValueError(f"lookahead must be within [0, {MAX_LOOKAHEAD}], got {lookahead}")
        self.lookahead = lookahead
        self.store: SchedulerStore = store or ScheduleStore(engine, subjects)
        self.claim_batch = claim_batch
        self.max_lateness = max_lateness
        self.lease = lease
        self.instance_id = instance_id or new_instance_id()
        self.max_skips = max_skips
        self.cache = CompiledCache(cache_size)
        self.on_outbox = on_outbox
        self.handoff = handoff
        self._log = log.bind(scheduler=self.instance_id)

    # --- public -----------------------------------------------------------------

    async def release_claims(self, *, everyone: bool = False) -> int:
        """
        Clear claims so the rows are claimable again at once.

        On shutdown a replica releases its own claims. With ``everyone`` (only
        for the embedded single-writer SQLite, at start-up) all claims go: the
        process that held them is dead, and waiting for the lease would only
        add lateness after a crash.

        Returns:
            Schedules and wakeups released.
        """
        released = await self.store.release_claims(owner=None if everyone else self.instance_id)
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
        skips are recorded with their reason. Then the store writes the plans
        in one transaction per batch (:meth:`SchedulerStore.apply_plans`): a
        schedule the API changed since the claim is dropped (the next tick
        recomputes it); the others get their fire rows (unique on
        (schedule_id, fire_at)), their new ``next_fire_at`` / ``last_fire_at``
        / ``enabled`` with the claim cleared, and one outbox row
        (``fire.created``, msg id = fire id) per inserted fire.

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

    async def claim_schedules(self, now: datetime) -> Sequence[ClaimedSchedule]:
        """
        Claim up to ``claim_batch`` due schedules for ``lease`` and return their rows.

        Due: enabled, ``next_fire_at <= now + lookahead``, and unclaimed or with an expired
        lease. The claim commits at once; :meth:`apply_schedules` writes the
        outcome later, checking that the API did not change the rows meanwhile.
        """
        return await self.store.claim_schedules(
            self.instance_id,
            now=now,
            due_by=now + self.lookahead,
            lease_until=now + self.lease,
            limit=self.claim_batch,
        )

    def _plan(
        self, row: ClaimedSchedule, now: datetime
    ) -> tuple[CompiledSchedule, SchedulePlan] | None:
        # An advanced pair's schedule is planned on the pair's clock (real now plus
        # its offset, which the row carries as next_fire_at - due_at), without
        # lookahead: a staged fire would be promoted on the real clock.
        offset = pair_offset(row)
        lookahead = timedelta(0) if row.due_at is not None else self.lookahead
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
                now=now + offset + lookahead,
                max_lateness=self.max_lateness + lookahead,
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

    async def apply_schedules(self, rows: Sequence[ClaimedSchedule], now: datetime) -> TickResult:
        """
        Plan claimed ``rows`` at ``now`` and write the outcome in one transaction.

        Args:
            rows: from :meth:`claim_schedules` (by this instance).
            now: the instant to plan for.

        Returns:
            What was written (``more`` is left false).
        """
        result = TickResult(claimed=len(rows))
        planned: list[PlannedSchedule] = []
        compiled: dict[str, CompiledSchedule] = {}
        for row in rows:
            outcome = self._plan(row, now)
            if outcome is None:
                result.failed += 1
                continue
            compiled[row.id], plan = outcome
            planned.append(PlannedSchedule(row, plan))
        if not planned:
            _count(result, {})
            return result

        applied = await self._apply_plans(planned, now)
        result.stale = len(applied.stale)
        result.fire_ids = applied.fire_ids
        result.fired = len(applied.fire_ids)
        result.skipped = applied.skipped
        result.conflicts = applied.conflicts
        result.handed = len(applied.handed)
        result.outbox = len(applied.fire_ids) - result.handed
        result.next_release = applied.next_release
        for schedule_id in applied.stale:
            self._log.info("schedule_changed_during_tick", schedule_id=schedule_id)

        # After the commit: the next claim of each schedule sees version + 1, so
        # the compiled cadence is still valid under the new key.
        skip_reasons: dict[str, int] = {}
        observe_lateness = metrics.SCHEDULER_FIRE_LATENESS.observe
        for p in planned:
            row, plan = p.row, p.plan
            if row.id not in applied.kept:
                continue
            self.cache.put((row.id, row.version + 1), compiled[row.id])
            if plan.fires:
                # The oldest fire of the pass says how late the scheduler is running.
                late = now + pair_offset(row) - plan.fires[0]
                observe_lateness(max(0.0, late.total_seconds()))
            for skip in plan.skips:
                skip_reasons[skip.reason] = skip_reasons.get(skip.reason, 0) + 1
            if plan.unitemised:
                skip_reasons["unitemised"] = skip_reasons.get("unitemised", 0) + plan.unitemised
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
        _count(result, skip_reasons)
        for fid in result.fire_ids:
            self._log.debug("fire_created", fire_id=fid)
        if result.conflicts:
            self._log.warning("fire_conflicts", conflicts=result.conflicts)
        return result

    async def _apply_plans(self, planned: Sequence[PlannedSchedule], now: datetime) -> AppliedPlans:
        """The store's :meth:`~SchedulerStore.apply_plans`, handing off what fits."""
        handoff = self.handoff
        granted = 0
        if handoff is not None:
            granted = handoff.reserve(sum(len(p.plan.fires) for p in planned))
        if handoff is None or not granted:
            return await self.store.apply_plans(self.instance_id, planned, now=now)
        try:
            applied = await self.store.apply_plans(
                self.instance_id,
                planned,
                now=now,
                hand_off=granted,
                held_until=now + handoff.grace,
            )
        except BaseException:
            handoff.cancel(granted)
            raise
        # Only after the commit: a ref handed earlier could be composed from a fire
        # row that then rolls back.
        handoff.put(applied.handed, granted)
        return applied

    # --- wakeups ----------------------------------------------------------------

    async def _tick_wakeups(self, now: datetime) -> tuple[int, bool]:
        """
        Claim pending wakeups due at ``now`` and queue one ``wakeup.due`` each.

        The wakeup stays ``pending`` (the dispatcher marks it executed when it
        creates the notification). The claim lasts ``lease``; if the wakeup is
        still pending after that, it is claimed again and its outbox row is
        re-armed (``sent_at`` cleared) so a message that never reached the
        dispatcher is sent again. JetStream dedupe and the notification's
        unique ``source_id`` absorb the repeat.
        """
        claimed = await self.store.claim_wakeups(
            self.instance_id, now=now, lease_until=now + self.lease, limit=self.claim_batch
        )
        if claimed:
            metrics.SCHEDULER_WAKEUPS.inc(len(claimed))
        for wakeup_id in claimed:
            self._log.debug("wakeup_due", wakeup_id=wakeup_id)
        return len(claimed), len(claimed) >= self.claim_batch


def _count(result: TickResult, skip_reasons: dict[str, int]) -> None:
    """One pass's counters, added once per batch."""
    if result.fired:
        metrics.SCHEDULER_FIRES.labels("fired").inc(result.fired)
    if result.skipped:
        metrics.SCHEDULER_FIRES.labels("skipped").inc(result.skipped)
    if result.conflicts:
        metrics.SCHEDULER_FIRES.labels("conflict").inc(result.conflicts)
    metrics.inc_each(metrics.SCHEDULER_FIRE_SKIPS, skip_reasons)
    metrics.inc_each(
        metrics.SCHEDULER_SCHEDULES,
        {"stale": result.stale, "failed": result.failed, "disabled": result.disabled},
    )
