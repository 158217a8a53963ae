"""
Pure planning for the scheduler: given one claimed schedule and ``now``, decide which
fires to emit, which ticks to record as skipped, and the schedule's new state.

Pure: no clock, no I/O; only :mod:`delivery.cadence` (itself pure)
is imported. The shell in :mod:`delivery.scheduler` reads rows, calls these functions
and writes what they return in one transaction.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from delivery.cadence import CompiledSchedule, Tick, next_fire, ticks_between
from delivery.domain import FireId

MISSED_MAX_LATENESS = "missed_max_lateness"
"""Skip reason of a tick that was due while nothing ran and is older than the max lateness."""

DEFAULT_MAX_SKIPS = 100
"""Skips itemised per schedule per plan; older ones are counted, not written (bounded work)."""

DEFAULT_SKIP_HORIZON = timedelta(days=2)
"""How far before the lateness cutoff missed ticks are itemised: bounds a plan after long
downtime to at most ~2 days of ticks (96/day at the densest, the Sonzai rate limit)."""

_EPSILON = timedelta(microseconds=1)

_FAST_SPAN = timedelta(days=7)
"""No zone has had two UTC-offset changes within a week (Morocco's Ramadan pause, the
closest, lasts about a month), so an equal offset at both ends of a shorter span means
no transition, hence no DST-gap tick, inside it."""


def fire_id(schedule_id: str, fire_at: datetime) -> FireId:
    """
    The id of the fire of ``schedule_id`` at ``fire_at``: the same everywhere, always.

    Derived from the pair that identifies a fire, so the
    scheduler, advance-time and a replay after a crash all compute the same id,
    and JetStream (``Nats-Msg-Id``) and the notification's unique ``source_id``
    can dedupe on it.
    """
    instant = _utc_text(fire_at if fire_at.tzinfo is UTC else fire_at.astimezone(UTC))
    digest = hashlib.sha256(f"{schedule_id}|{instant}".encode()).hexdigest()
    return FireId("fire_" + digest[:24])


@lru_cache(maxsize=1024)
def _utc_text(utc: datetime) -> str:
    """
    ``utc.isoformat()``, cached: a burst's fires share a few instants. Only UTC values
    are cached, as two local times that differ only in ``fold`` compare and hash
    equal while being an hour apart.
    """
    return utc.isoformat()


@dataclass(frozen=True, slots=True)
class Skip:
    """A cadence tick that produced no fire, and why (recorded for operators)."""

    fire_at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class SchedulePlan:
    """
    What one scheduler pass does to one schedule.

    Attributes:
        fires: instants to fire now, oldest first (each becomes a fire row + outbox row).
        skips: ticks to record as ``status='skipped'``, oldest first, at most
            ``max_skips`` of them.
        next_fire_at: the schedule's new ``next_fire_at`` (``None``: nothing next).
        last_fire_at: the schedule's new ``last_fire_at``.
        disable: set ``enabled`` to false (``ends_at`` passed or no fire can follow it).
        missed: missed ticks (older than the max lateness) that were counted.
        unitemised: skips counted but not written because of ``max_skips``.
        truncated: the scan was clamped after a long downtime, so missed ticks
            between ``due_from`` and the scan start were neither counted nor written.
    """

    fires: tuple[datetime, ...]
    skips: tuple[Skip, ...]
    next_fire_at: datetime | None
    last_fire_at: datetime | None
    disable: bool
    missed: int = 0
    unitemised: int = 0
    truncated: bool = False


def scan_after(
    *,
    due_from: datetime,
    handled_until: datetime | None,
    now: datetime,
    max_lateness: timedelta,
    skip_horizon: timedelta = DEFAULT_SKIP_HORIZON,
) -> datetime:
    """
    The exclusive lower bound of the ticks a pass must look at.

    Normally just before ``handled_until`` (the last instant an earlier pass or
    the API accounted for), so active-window and DST skips since then are
    recorded, and never after ``due_from`` (``next_fire_at``, the first fire not
    yet produced). After a long downtime it is clamped to ``skip_horizon`` before
    the lateness cutoff so the work stays bounded; :func:`plan_ticks` then
    records ``due_from`` itself as the first missed tick.
    """
    after = due_from - _EPSILON
    if handled_until is not None and handled_until < after:
        after = handled_until
    floor = now - max_lateness - skip_horizon
    return max(after, floor)


def plan_ticks(
    ticks: Sequence[Tick],
    *,
    due_from: datetime,
    scanned_after: datetime,
    now: datetime,
    max_lateness: timedelta,
    next_fire_at: datetime | None,
    last_fire_at: datetime | None,
    ends_at: datetime | None,
    max_skips: int = DEFAULT_MAX_SKIPS,
) -> SchedulePlan:
    """
    Classify the raw ticks of one schedule in ``(scanned_after, now]``.

    Rules (catch-up after downtime):

    * a tick the cadence skipped (active window, DST gap) is recorded with its
      reason, never deferred;
    * a firing tick before ``due_from`` was already produced or was superseded
      by an API write that moved ``next_fire_at``: ignored;
    * a firing tick older than ``now - max_lateness`` is recorded as skipped
      ``missed_max_lateness``; a younger one fires, once;
    * when the scan started after ``due_from`` (long downtime) ``due_from``
      itself is recorded as the first missed tick, and the ticks between are
      counted as unitemised;
    * ``disable`` when ``ends_at`` has passed, or when it bounds a schedule
      that has no next fire (nothing can ever fire again).

    Args:
        ticks: ``ticks_between(compiled, scanned_after, now)``.
        due_from: the schedule's ``next_fire_at`` when claimed.
        scanned_after: the exclusive lower bound the ticks were computed from.
        now: the pass's instant.
        max_lateness: how late a fire may still be produced.
        next_fire_at: ``next_fire(compiled, now)``.
        last_fire_at: the schedule's ``last_fire_at`` when claimed.
        ends_at: the schedule's exclusive upper bound.
        max_skips: at most this many skips are itemised; the earliest (the
            start of a gap) and the latest are kept.

    Returns:
        The plan; pure function of its arguments.
    """
    cutoff = now - max_lateness
    fires: list[datetime] = []
    skips: list[Skip] = []
    missed = 0
    unitemised = 0
    truncated = scanned_after >= due_from and due_from < cutoff
    if truncated:
        # The scan was clamped: due_from (a real tick) starts the gap; record it so
        # an operator sees when the outage began.
        skips.append(Skip(due_from, MISSED_MAX_LATENESS))
        missed += 1
    fire_set: set[datetime] = set()
    for tick in ticks:
        if tick.skipped is not None:
            skips.append(Skip(tick.fire_at, tick.skipped.value))
        elif tick.fire_at < due_from:
            continue
        elif tick.fire_at < cutoff:
            skips.append(Skip(tick.fire_at, MISSED_MAX_LATENESS))
            missed += 1
        else:
            fires.append(tick.fire_at)
            fire_set.add(tick.fire_at)
    # A DST-gap tick maps to an instant another tick may also have: the fire wins
    # (one row per (schedule_id, fire_at)).
    seen: set[datetime] = set()
    unique_skips: list[Skip] = []
    for skip in sorted(skips, key=lambda s: s.fire_at):
        if skip.fire_at in fire_set or skip.fire_at in seen:
            continue
        seen.add(skip.fire_at)
        unique_skips.append(skip)
    if len(unique_skips) > max_skips:
        keep = [unique_skips[0], *unique_skips[len(unique_skips) - (max_skips - 1) :]]
        unitemised += len(unique_skips) - len(keep)
        unique_skips = keep if max_skips > 0 else []
    fires.sort()
    new_last = fires[-1] if fires else last_fire_at
    disable = ends_at is not None and (ends_at <= now or next_fire_at is None)
    return SchedulePlan(
        fires=tuple(fires),
        skips=tuple(unique_skips),
        next_fire_at=None if disable else next_fire_at,
        last_fire_at=new_last,
        disable=disable,
        missed=missed,
        unitemised=unitemised,
        truncated=truncated,
    )


def _ticks_and_next(
    compiled: CompiledSchedule, after: datetime, now: datetime
) -> tuple[list[Tick], datetime | None]:
    """
    ``ticks_between(compiled, after, now)`` and ``next_fire(compiled, now)``, fast.

    Without an active window and without a UTC-offset change in ``(after, now]``
    no tick can be skipped, so the ticks are exactly the fires ``next_fire``
    walks through (its documented contract), at ~4 us a step instead of a
    ~80 us wall-clock walk; the last step is the next fire. Otherwise the
    cadence engine's full ``ticks_between`` runs.
    """
    if after >= now:
        return [], next_fire(compiled, now)
    zone = compiled.zone
    if (
        compiled.active_window is None
        and now - after <= _FAST_SPAN
        and after.astimezone(zone).utcoffset() == now.astimezone(zone).utcoffset()
    ):
        ticks: list[Tick] = []
        fire = next_fire(compiled, after)
        while fire is not None and fire <= now:
            ticks.append(Tick(fire, fire.astimezone(zone).replace(tzinfo=None), None))
            fire = next_fire(compiled, fire)
        return ticks, fire
    return ticks_between(compiled, after, now), next_fire(compiled, now)


def plan_schedule(
    compiled: CompiledSchedule,
    *,
    due_from: datetime,
    handled_until: datetime | None,
    now: datetime,
    max_lateness: timedelta,
    last_fire_at: datetime | None,
    max_skips: int = DEFAULT_MAX_SKIPS,
    skip_horizon: timedelta = DEFAULT_SKIP_HORIZON,
) -> SchedulePlan:
    """
    Plan one claimed schedule with the cadence engine: :func:`scan_after`, then
    ``ticks_between`` and ``next_fire``, then :func:`plan_ticks`.

    Args:
        compiled: the schedule's compiled cadence.
        due_from: its ``next_fire_at`` when claimed.
        handled_until: the latest instant already accounted for (its
            ``last_fire_at`` or the API's last write, whichever is later).
        now: the pass's instant.
        max_lateness: how late a fire may still be produced.
        last_fire_at: its ``last_fire_at`` when claimed.
        max_skips: bound on itemised skips.
        skip_horizon: bound on how far back missed ticks are scanned.
    """
    after = scan_after(
        due_from=due_from,
        handled_until=handled_until,
        now=now,
        max_lateness=max_lateness,
        skip_horizon=skip_horizon,
    )
    ticks, following = _ticks_and_next(compiled, after, now)
    return plan_ticks(
        ticks,
        due_from=due_from,
        scanned_after=after,
        now=now,
        max_lateness=max_lateness,
        next_fire_at=following,
        last_fire_at=last_fire_at,
        ends_at=compiled.ends_at,
        max_skips=max_skips,
    )


BEFORE_PAIR_CLOCK = "before_pair_clock"
"""
Skip reason of a tick a schedule never had the chance to fire: it lies between real
time and its (agent, user) pair's advanced clock when the schedule was created.
"""


BEHIND_CLOCK_HORIZON = timedelta(days=31)
"""How far behind an advanced pair's clock :func:`ticks_behind_clock` looks (bounded work)."""


def ticks_behind_clock(
    compiled: CompiledSchedule,
    *,
    real_now: datetime,
    pair_now: datetime,
    max_skips: int = DEFAULT_MAX_SKIPS,
    skip_horizon: timedelta = BEHIND_CLOCK_HORIZON,
) -> list[Skip]:
    """
    The ticks a schedule created on an advanced pair's clock passed over, as skips.

    The schedule is created at the pair's ``pair_now``; the ticks in
    ``(real_now, pair_now]`` are in that clock's past (they are never fired) but
    in real time's future, where a reader would look for them, so they are
    recorded: ``before_pair_clock``, or the cadence's own reason (active window,
    DST gap) when it would have skipped the tick anyway. Bounded like the
    scheduler's catch-up: only those of the last ``skip_horizon``, and at most
    ``max_skips`` of them, the latest.
    """
    if pair_now <= real_now:
        return []
    after = max(real_now, pair_now - skip_horizon)
    ticks = ticks_between(compiled, after, pair_now)[-max_skips:] if max_skips > 0 else []
    return [
        Skip(t.fire_at, BEFORE_PAIR_CLOCK if t.skipped is None else t.skipped.value) for t in ticks
    ]
