"""
Delivery policy: the rules that decide, across all of a user's sources, whether a
composed message goes out now, later, or not at all. Pure: no clock, no I/O.

A project's policy (:class:`ProjectPolicy`, stored as JSON, managed over
``/api/v1/policy``) has every rule off by default, so a project that never set one
behaves exactly as before. A source (schedule, wakeup, trigger event) may carry its
own :class:`SourcePolicy` (``priority``, ``outside_window``, ``ttl_seconds`` /
``expires_at``, ``supersede_key``), stored as JSON beside it.

* Attention budget: at most ``limit`` messages per user in a rolling ``window_s``
  across every source; over it, a message below ``critical`` is suppressed
  (``suppressed`` / :data:`ATTENTION_BUDGET`); ``critical`` always passes and counts.
  :func:`allot` decides one user's candidates; the store calls it inside the
  transaction that writes them, with the user's counter row locked.
* Quiet hours (:class:`QuietHours`, per user): a message due inside them is skipped
  (``suppressed`` / :data:`QUIET_HOURS`) or deferred to the next opening
  (:meth:`QuietHours.next_opening`, DST-correct through
  :func:`delivery.cadence.zones.wall_to_utc`).
* Freshness: a message carries a deadline (:meth:`SourcePolicy.deadline`); one
  not consumed or delivered by then is ``expired``. A ``supersede_key`` makes a
  new message replace the user's pending one with the same key (``superseded``).
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from delivery.cadence.window import Window


class Priority(StrEnum):
    """How much a message matters when the attention budget is short."""

    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"


RANK: Mapping[str, int] = {"low": 0, "normal": 1, "high": 2, "critical": 3}
"""Priority -> order (higher first when the budget is shared out)."""

OUTSIDE_WINDOW = ("skip", "defer")
"""What happens to a message due inside quiet hours."""

SUPPRESSED = "suppressed"
EXPIRED = "expired"
SUPERSEDED = "superseded"
"""Notification statuses the policies set (beside pending, consumed, ...)."""

ATTENTION_BUDGET = "attention_budget"
QUIET_HOURS = "quiet_hours"
DEFERRED = "deferred_quiet_hours"
DEFERRED_WINDOW = "deferred_active_window"
TTL = "deadline_passed"
SUPERSEDED_BY_KEY = "supersede_key"
SUPERSEDED_BY_NEXT_FIRE = "next_regular_fire"
"""``status_reason`` values: why a policy set the status (shown by the timeline)."""

NOT_COUNTED = ("suppressed", "failed_generation", "superseded")
"""Statuses of messages that never spent a unit of the attention budget."""


def past_deadline(deadline: datetime | None, now: datetime) -> bool:
    """
    Whether a message with ``deadline`` (its ``expires_at``) is stale at ``now``, swept
    or not: the one rule every sender checks in Python before it sends (the store
    spells the same rule in SQL as :func:`delivery.store.notifications.live_at`).
    """
    return deadline is not None and deadline <= now


@dataclass(frozen=True, slots=True)
class AttentionBudget:
    """At most ``limit`` messages per user in any ``window_s`` seconds."""

    limit: int
    window_s: int


@dataclass(frozen=True, slots=True)
class ProjectPolicy:
    """
    A project's delivery policy; the default (every field ``None``) changes nothing.

    Attributes:
        attention_budget: the per-user budget, or ``None`` (no limit).
        outside_window: what a source that says nothing does inside a user's quiet
            hours (``skip`` when ``None``).
    """

    attention_budget: AttentionBudget | None = None
    outside_window: str | None = None

    @property
    def is_default(self) -> bool:
        """Whether no rule is on (the dispatcher then skips every policy step)."""
        return self.attention_budget is None and self.outside_window is None

    def to_json(self) -> dict[str, Any]:
        """The wire and stored form (absent rules are ``null``)."""
        budget = self.attention_budget
        return {
            "attention_budget": None
            if budget is None
            else {"limit": budget.limit, "window_seconds": budget.window_s},
            "outside_window": self.outside_window,
        }


DEFAULT_POLICY = ProjectPolicy()


def project_policy(text: str | None) -> ProjectPolicy:
    """The stored policy JSON as a value (``None`` or damaged text: the default)."""
    if not text:
        return DEFAULT_POLICY
    try:
        raw = json.loads(text)
    except ValueError:
        return DEFAULT_POLICY
    if not isinstance(raw, dict):
        return DEFAULT_POLICY
    budget = raw.get("attention_budget")
    return ProjectPolicy(
        attention_budget=AttentionBudget(int(budget["limit"]), int(budget["window_seconds"]))
        if isinstance(budget, dict)
        else None,
        outside_window=raw.get("outside_window"),
    )


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    """
    What a schedule, wakeup or trigger event says about its own messages.

    Attributes:
        priority: ``low | normal | high | critical``.
        outside_window: ``skip | defer`` inside the user's quiet hours; ``None``
            follows the project's policy.
        ttl_seconds: a message not consumed or delivered this long after its fire
            instant expires.
        expires_at: an absolute deadline (the earlier of the two wins).
        supersede_key: a new message with this key replaces the user's pending one.
    """

    priority: str = Priority.NORMAL.value
    outside_window: str | None = None
    ttl_seconds: int | None = None
    expires_at: datetime | None = None
    supersede_key: str | None = None

    def deadline(self, fire_at: datetime) -> datetime | None:
        """The instant after which the message of a fire at ``fire_at`` is stale."""
        ends = [self.expires_at] if self.expires_at is not None else []
        if self.ttl_seconds is not None:
            ends.append(fire_at + timedelta(seconds=self.ttl_seconds))
        return min(ends) if ends else None

    def to_json(self) -> dict[str, Any]:
        """The stored form: only what differs from the default."""
        out: dict[str, Any] = {}
        if self.priority != Priority.NORMAL:
            out["priority"] = self.priority
        if self.outside_window is not None:
            out["outside_window"] = self.outside_window
        if self.ttl_seconds is not None:
            out["ttl_seconds"] = self.ttl_seconds
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at.astimezone(UTC).isoformat()
        if self.supersede_key is not None:
            out["supersede_key"] = self.supersede_key
        return out

    def stored(self) -> str | None:
        """The column value: canonical JSON, or ``None`` for the default."""
        out = self.to_json()
        return json.dumps(out, sort_keys=True, separators=(",", ":")) if out else None


DEFAULT_SOURCE = SourcePolicy()


def source_policy(text: str | None) -> SourcePolicy:
    """A source's stored policy JSON as a value (``None``: the default)."""
    if not text:
        return DEFAULT_SOURCE
    try:
        raw = json.loads(text)
    except ValueError:
        return DEFAULT_SOURCE
    if not isinstance(raw, dict):
        return DEFAULT_SOURCE
    expires = raw.get("expires_at")
    return SourcePolicy(
        priority=raw.get("priority") or Priority.NORMAL.value,
        outside_window=raw.get("outside_window"),
        ttl_seconds=raw.get("ttl_seconds"),
        expires_at=datetime.fromisoformat(expires) if isinstance(expires, str) else None,
        supersede_key=raw.get("supersede_key"),
    )


@dataclass(frozen=True, slots=True)
class QuietHours:
    """
    A user's quiet hours: ``[start, end)`` in minutes after local midnight in ``zone``
    (``start > end`` wraps midnight, as the schedules' active window does).
    """

    timezone: str
    start: int
    end: int
    open: Window = field(init=False, repr=False, compare=False)
    """The rest of the day: when a message may go out."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "open", Window(ZoneInfo(self.timezone), self.end, self.start))

    def contains(self, instant: datetime) -> bool:
        """Whether ``instant`` falls inside the quiet hours (on the user's wall clock)."""
        return not self.open.contains(instant)

    def next_opening(self, instant: datetime) -> datetime:
        """
        The first instant at or after ``instant`` outside the quiet hours: their end on
        the user's wall clock, or right after a spring-forward jump that skips it
        (:meth:`delivery.cadence.Window.next_inside`).
        """
        opening = self.open.next_inside(instant)
        if opening is None:  # pragma: no cover - every day is allowed
            raise AssertionError("quiet hours never open")
        return opening


def quiet_wait(
    quiet: QuietHours | None, at: datetime, deadline: datetime | None
) -> datetime | None:
    """
    When a send due at ``at`` (a channel retry or fallback step) should wait until:
    ``None`` to send now; inside the user's quiet hours, their end
    (:meth:`QuietHours.next_opening`, the dispatcher's defer instant), or the message's
    ``deadline`` when that comes first (it then expires instead of being sent). Every
    priority waits, as the dispatcher holds a ``critical`` message out of quiet hours
    too (priority only weighs against the attention budget).
    """
    if quiet is None or not quiet.contains(at):
        return None
    opening = quiet.next_opening(at)
    return opening if deadline is None else min(opening, deadline)


def quiet_hours(row: Any) -> QuietHours | None:
    """A ``user_quiet_hours`` row (a mapping) as a value."""
    if row is None:
        return None
    return QuietHours(row["timezone"], row["start_minute"], row["end_minute"])


@dataclass(frozen=True, slots=True)
class Candidate:
    """One message asking for a unit of a user's attention budget."""

    key: str
    priority: str
    at: datetime


def allot(candidates: Sequence[Candidate], used: int, limit: int) -> tuple[list[str], list[str]]:
    """
    Share a user's remaining budget among ``candidates``: (passed keys, suppressed keys).

    Highest priority first, then earliest; ``critical`` always passes and still
    spends a unit (so it can leave nothing for the messages after it).
    """
    remaining = limit - used
    passed: list[str] = []
    suppressed: list[str] = []
    for c in sorted(candidates, key=lambda c: (-RANK.get(c.priority, 1), c.at, c.key)):
        if c.priority == Priority.CRITICAL or remaining > 0:
            passed.append(c.key)
            remaining -= 1
        else:
            suppressed.append(c.key)
    return passed, suppressed


def allot_rolling(
    candidates: Sequence[Candidate],
    counted: Sequence[datetime],
    limit: int,
    window: timedelta,
) -> tuple[list[str], list[str]]:
    """
    :func:`allot` for candidates dated at different instants of one clock (an advanced
    pair's, whose advance dates a day's messages over days): each instant's
    candidates share what the window ending at it leaves, counting ``counted`` (the
    instants of the messages already spent, each until it leaves the window; one
    dated after the instant is one held for later and counts too) and the
    candidates passed at earlier instants. (passed keys, suppressed keys).
    """
    spent = sorted(counted)
    at_instant: dict[datetime, list[Candidate]] = {}
    for c in candidates:
        at_instant.setdefault(c.at, []).append(c)
    passed: list[str] = []
    suppressed: list[str] = []
    for instant in sorted(at_instant):
        since = instant - window
        used = sum(1 for t in spent if t > since)
        now_passed, now_suppressed = allot(at_instant[instant], used, limit)
        passed += now_passed
        suppressed += now_suppressed
        spent += [instant] * len(now_passed)
    return passed, suppressed


@dataclass(frozen=True, slots=True)
class Outcome:
    """
    What the pure rules decided for one message before it is written.

    Attributes:
        status: the status to write instead of the composed one (``None``: keep it).
        reason: the ``status_reason`` to record, or ``None``.
        due_at: a deferred message's new instant (it is staged until then).
        expires_at: the message's deadline, or ``None``.
    """

    status: str | None = None
    reason: str | None = None
    due_at: datetime | None = None
    expires_at: datetime | None = None


KEEP = Outcome()


def decide(
    source: SourcePolicy,
    project: ProjectPolicy,
    quiet: QuietHours | None,
    *,
    due: datetime,
    fire_at: datetime,
    next_fire_at: datetime | None,
    window: Window | None = None,
) -> Outcome:
    """
    The quiet-hours and freshness rules for one message due at ``due``.

    ``window`` (a deferring schedule's active window): a fire outside it moves to
    the window's next opening (:data:`DEFERRED_WINDOW`). Inside the user's quiet
    hours the source's ``outside_window`` (else the project's, else ``skip``)
    decides: ``skip`` suppresses it (:data:`QUIET_HOURS`); ``defer`` moves it to
    their end (:data:`DEFERRED`). A message moved to or past the source's next
    regular fire (``next_fire_at``) is superseded by it
    (:data:`SUPERSEDED_BY_NEXT_FIRE`): one deferred fire is delivered at most
    once, and never after the fire that follows it. A message whose deadline is
    not after the instant it would go out is expired at once (:data:`TTL`).
    """
    expires_at = source.deadline(fire_at)
    at = due
    reason: str | None = None
    # The two windows may push each other (a window opening inside quiet hours);
    # a few rounds settle any pair of real windows.
    for _ in range(8):
        moved = False
        if window is not None and not window.contains(at):
            opening = window.next_inside(at)
            if opening is None:  # pragma: no cover - the API refuses such a window
                return Outcome(SUPPRESSED, DEFERRED_WINDOW, None, expires_at)
            at, reason, moved = opening, DEFERRED_WINDOW, True
        if quiet is not None and quiet.contains(at):
            action = source.outside_window or project.outside_window or "skip"
            if action != "defer":
                return Outcome(SUPPRESSED, QUIET_HOURS, None, expires_at)
            at, reason, moved = quiet.next_opening(at), DEFERRED, True
        if not moved:
            break
    due_at: datetime | None = None
    if at != due:
        if next_fire_at is not None and at >= next_fire_at:
            return Outcome(SUPERSEDED, SUPERSEDED_BY_NEXT_FIRE, None, expires_at)
        due_at = at
    if expires_at is not None and expires_at <= at:
        return Outcome(EXPIRED, TTL, None, expires_at)
    if reason is None and expires_at is None:
        return KEEP
    return Outcome(None, reason, due_at, expires_at)
