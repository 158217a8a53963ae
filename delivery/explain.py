"""
"Did the user get a message around this instant, and if not, why?" as a pure decision.

:func:`explain` takes plain facts (the schedules, the fires, the messages and the
webhook attempts around the instant, read by :mod:`delivery.store.timeline`) and
returns an :class:`Explanation`: a stable machine ``code`` and one sentence. No
clock, no I/O; the route and the CLI read the facts and call it.

The reasons, in the order they are looked for:

1. a message was made around the instant: ``delivered`` (consumed by a poll or a
   webhook 2xx), ``composition_failed``, ``webhook_failing`` (pending while the
   endpoint answers errors), ``pending`` (in the queue, nobody took it yet),
   ``expired``;
2. a tick was recorded but made no message: ``dst_gap``, ``outside_active_window``,
   ``missed_max_lateness`` (the daemon was down longer than the maximum lateness),
   ``not_composed`` (fired, the dispatcher has not written its message yet);
3. nothing was recorded: the cadence is asked which ticks fell in the window, then
   ``schedule_ended``, ``schedule_disabled``, ``schedule_not_started``,
   ``not_fired`` (due, but no scheduler has run it), ``not_due_yet``;
   ``not_covered`` (schedules exist, none ticks there) or ``no_schedule``.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from delivery.cadence import CompiledSchedule, compile_schedule, ticks_between
from delivery.errors import BadRequestError, InvalidRequestError
from delivery.timeline import local_time, skip_rule, window_text, zone_of


class Reason(StrEnum):
    """The machine code of an explanation."""

    DELIVERED = "delivered"
    PENDING = "pending"
    WEBHOOK_FAILING = "webhook_failing"
    COMPOSITION_FAILED = "composition_failed"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    SUPERSEDED = "superseded"
    DST_GAP = "dst_gap"
    OUTSIDE_ACTIVE_WINDOW = "outside_active_window"
    MISSED_MAX_LATENESS = "missed_max_lateness"
    NOT_COMPOSED = "not_composed"
    SCHEDULE_ENDED = "schedule_ended"
    SCHEDULE_DISABLED = "schedule_disabled"
    SCHEDULE_NOT_STARTED = "schedule_not_started"
    NOT_FIRED = "not_fired"
    NOT_DUE_YET = "not_due_yet"
    NOT_COVERED = "not_covered"
    NO_SCHEDULE = "no_schedule"


@dataclass(frozen=True, slots=True)
class ScheduleFacts:
    """A schedule as stored now, plus when (if ever) it was last disabled."""

    id: str
    timezone: str
    cadence_json: str
    active_window_json: str | None
    starts_at: datetime | None
    ends_at: datetime | None
    anchor_at: datetime
    enabled: bool
    created_at: datetime
    disabled_at: datetime | None = None
    """The last change that disabled it, if it is disabled now."""


@dataclass(frozen=True, slots=True)
class FireFacts:
    """One ``fires`` row."""

    id: str
    schedule_id: str
    fire_at: datetime
    status: str
    skip_reason: str | None


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """One notification, and how its delivery went."""

    id: str
    source_id: str
    source_type: str
    schedule_id: str | None
    status: str
    fire_at: datetime
    created_at: datetime
    consumed_at: datetime | None
    error: str | None
    status_reason: str | None = None
    """Why a delivery policy set the status (:mod:`delivery.policy`), or ``None``."""
    consumed_by_webhook: bool = False
    last_attempt_status: int | None = None
    """The last webhook attempt's HTTP status (0: no answer), ``None`` when none."""
    last_attempt_error: str | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None
    dead_lettered: bool = False
    endpoint_disabled: str | None = None
    """Why the endpoint of the failing delivery is disabled, when it is."""
    endpoint_disabled_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ExplainFacts:
    """Everything :func:`explain` looks at, read once."""

    at: datetime
    window: timedelta
    now: datetime
    max_lateness: timedelta
    schedules: Sequence[ScheduleFacts]
    fires: Sequence[FireFacts]
    messages: Sequence[MessageFacts]
    deleted_schedules: Sequence[tuple[str, datetime]] = ()
    """(schedule id, deleted at) of schedules deleted before the window ended."""


@dataclass(frozen=True, slots=True)
class Explanation:
    """The answer: a code, a sentence, and the ids it rests on."""

    code: Reason
    sentence: str
    got_message: bool
    schedule_id: str | None = None
    fire_id: str | None = None
    message_id: str | None = None
    timezone: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The wire form (absent ids omitted)."""
        out: dict[str, Any] = {
            "code": self.code.value,
            "sentence": self.sentence,
            "got_message": self.got_message,
        }
        for name in ("schedule_id", "fire_id", "message_id", "timezone"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


MAX_WINDOW = timedelta(days=7)
DEFAULT_WINDOW = timedelta(hours=1)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(raw: str | None) -> timedelta:
    """
    The ``window`` around the instant: ``90s``, ``30m``, ``2h``, ``1d`` or bare seconds.

    Raises:
        InvalidRequestError: not such a duration, zero, or over 7 days.
    """
    if raw is None or raw == "":
        return DEFAULT_WINDOW
    text = raw.strip().lower()
    unit = _UNITS.get(text[-1:], 0)
    number = text[:-1] if unit else text
    if not number.isdigit() or len(number) > 9:
        raise InvalidRequestError(
            "window", f"window must be a duration like 90s, 30m, 2h or 1d; got {raw!r}"
        )
    window = timedelta(seconds=int(number) * (unit or 1))
    if not timedelta(0) < window <= MAX_WINDOW:
        raise InvalidRequestError(
            "window", f"window must be more than 0 and at most 7d; got {raw!r}"
        )
    return window


def _when(at: datetime, zone: str | None) -> str:
    return f"{local_time(at, zone)} ({zone or 'UTC'})"


def _closest[T](items: Sequence[T], at: datetime, instant: Any) -> T | None:
    return min(items, key=lambda item: abs(instant(item) - at), default=None)


def _compiled(schedule: ScheduleFacts, *, bounded: bool) -> CompiledSchedule | None:
    cadence = json.loads(schedule.cadence_json)
    if isinstance(cadence, dict) and "timezone" not in cadence:
        cadence = {**cadence, "timezone": schedule.timezone}
    window = json.loads(schedule.active_window_json) if schedule.active_window_json else None
    try:
        return compile_schedule(
            cadence,
            window,
            starts_at=schedule.starts_at if bounded else None,
            ends_at=schedule.ends_at if bounded else None,
            created_at=schedule.anchor_at,
        )
    except (BadRequestError, ValueError):
        return None


def _message_story(m: MessageFacts, zone: str | None, schedule_id: str | None) -> Explanation:
    made = f"message {m.id} was composed at {_when(m.created_at, zone)}"
    common = {"schedule_id": schedule_id, "message_id": m.id, "timezone": zone}
    if m.status == "consumed":
        how = "a webhook answered 2xx" if m.consumed_by_webhook else "it was consumed by a poll"
        when = _when(m.consumed_at, zone) if m.consumed_at else "an unknown time"
        sentence = f"Yes: {made} and delivered: {how} at {when}."
        return Explanation(Reason.DELIVERED, sentence, True, **common)
    if m.status == "failed_generation":
        sentence = (
            f"No: the {m.source_type} fired at {_when(m.fire_at, zone)}, but composing its "
            f"message failed ({m.error or 'no error recorded'}); message {m.id} was kept as "
            "failed_generation and is never sent."
        )
        return Explanation(Reason.COMPOSITION_FAILED, sentence, False, **common)
    if m.status == "expired":
        if m.status_reason == "deadline_passed":
            sentence = (
                f"No: {made} but its deadline (ttl_seconds / expires_at) passed before it "
                "was delivered, so it expired (expired/deadline_passed) and is never sent."
            )
        else:
            sentence = f"No: {made} but expired in the queue before anyone took it."
        return Explanation(Reason.EXPIRED, sentence, False, **common)
    if m.status == "suppressed":
        why = {
            "attention_budget": "the user's attention budget for the window was already "
            "spent by other messages (suppressed/attention_budget)",
            "quiet_hours": "it fell inside the user's quiet hours and its source skips "
            "them (suppressed/quiet_hours)",
        }.get(m.status_reason or "", f"a delivery policy suppressed it ({m.status_reason})")
        sentence = f"No: {made} but was not sent: {why}."
        return Explanation(Reason.SUPPRESSED, sentence, False, **common)
    if m.status == "superseded":
        why = {
            "supersede_key": "a newer message with the same supersede_key replaced it",
            "next_regular_fire": "it was deferred out of the user's quiet hours, which end "
            "only after the schedule's next fire, so that fire replaced it",
        }.get(m.status_reason or "", f"it was superseded ({m.status_reason})")
        sentence = f"No: {made} but was not sent: {why}."
        return Explanation(Reason.SUPERSEDED, sentence, False, **common)
    if m.last_attempt_status is not None and m.last_attempt_at is not None:
        answer = (
            f"HTTP {m.last_attempt_status}"
            if m.last_attempt_status
            else (m.last_attempt_error or "no answer")
        )
        then = (
            "it was dead-lettered: no more retries"
            if m.dead_lettered
            else (
                f"the next retry is at {_when(m.next_attempt_at, zone)}"
                if m.next_attempt_at
                else "no retry is planned"
            )
        )
        disabled = ""
        if m.endpoint_disabled is not None:
            since = f" at {_when(m.endpoint_disabled_at, zone)}" if m.endpoint_disabled_at else ""
            disabled = (
                f" The endpoint was disabled{since} ({m.endpoint_disabled}); re-enable it "
                "and recover the messages since then."
            )
        sentence = (
            f"No: {made}, but the webhook is failing: the last attempt at "
            f"{_when(m.last_attempt_at, zone)} got {answer}; {then}. The message is still "
            f"pending in the queue.{disabled}"
        )
        return Explanation(Reason.WEBHOOK_FAILING, sentence, False, **common)
    if m.status == "staged" and m.status_reason == "deferred_quiet_hours":
        sentence = (
            f"Not yet: {made} inside the user's quiet hours and deferred to their end: it "
            f"is shown from {_when(m.fire_at, zone)}."
        )
        return Explanation(Reason.PENDING, sentence, False, **common)
    if m.status == "staged":
        sentence = (
            f"Not yet: {made} ahead of its instant and is shown from "
            f"{_when(m.fire_at, zone)}; it is still pending."
        )
        return Explanation(Reason.PENDING, sentence, False, **common)
    sentence = (
        f"Not yet: {made} and is still pending in the queue: no client has polled it and no "
        "webhook has consumed it."
    )
    return Explanation(Reason.PENDING, sentence, False, **common)


def _fire_story(
    fire: FireFacts, schedule: ScheduleFacts | None, facts: ExplainFacts
) -> Explanation:
    zone = schedule.timezone if schedule else None
    common = {"schedule_id": fire.schedule_id, "fire_id": fire.id, "timezone": zone}
    if fire.status == "skipped" and fire.skip_reason:
        window = (
            json.loads(schedule.active_window_json)
            if schedule and schedule.active_window_json
            else None
        )
        rule = skip_rule(fire.skip_reason, fire.fire_at, zone, window, facts.max_lateness)
        try:
            code = Reason(fire.skip_reason)
        except ValueError:
            code = Reason.NOT_COVERED
        sentence = (
            f"No: schedule {fire.schedule_id} had a tick at {_when(fire.fire_at, zone)}; {rule}."
        )
        return Explanation(code, sentence, False, **common)
    sentence = (
        f"Not yet: schedule {fire.schedule_id} fired at {_when(fire.fire_at, zone)}, but its "
        "message has not been composed yet (the dispatcher has not processed the fire)."
    )
    return Explanation(Reason.NOT_COMPOSED, sentence, False, **common)


def _expected(
    schedule: ScheduleFacts, facts: ExplainFacts, lo: datetime, hi: datetime
) -> Explanation | None:
    """Why a schedule whose cadence ticks in the window recorded nothing there."""
    unbounded = _compiled(schedule, bounded=False)
    if unbounded is None:
        return None
    ticks = [t for t in ticks_between(unbounded, lo, hi) if t.skipped is None]
    tick = _closest(ticks, facts.at, lambda t: t.fire_at)
    if tick is None:
        return None
    zone = schedule.timezone
    when = _when(tick.fire_at, zone)
    common = {"schedule_id": schedule.id, "timezone": zone}
    if tick.fire_at < schedule.created_at:
        return None
    if schedule.ends_at is not None and tick.fire_at >= schedule.ends_at:
        sentence = (
            f"No: schedule {schedule.id} would have fired at {when}, but it had ended: its "
            f"ends_at is {_when(schedule.ends_at, zone)}, after which it is disabled."
        )
        return Explanation(Reason.SCHEDULE_ENDED, sentence, False, **common)
    if not schedule.enabled and (
        schedule.disabled_at is None or schedule.disabled_at <= tick.fire_at
    ):
        since = f" since {_when(schedule.disabled_at, zone)}" if schedule.disabled_at else ""
        sentence = (
            f"No: schedule {schedule.id} would have fired at {when}, but it was disabled{since}."
        )
        return Explanation(Reason.SCHEDULE_DISABLED, sentence, False, **common)
    if schedule.starts_at is not None and tick.fire_at < schedule.starts_at:
        sentence = (
            f"No: schedule {schedule.id} would have fired at {when}, but it only starts at "
            f"{_when(schedule.starts_at, zone)}."
        )
        return Explanation(Reason.SCHEDULE_NOT_STARTED, sentence, False, **common)
    if tick.fire_at > facts.now:
        sentence = f"Not yet: schedule {schedule.id} fires at {when}, which is still ahead."
        return Explanation(Reason.NOT_DUE_YET, sentence, False, **common)
    sentence = (
        f"No: schedule {schedule.id} was due at {when}, but no fire was recorded: no scheduler "
        "has run it yet (the daemon is down or behind). Within the maximum lateness "
        f"it still fires when the scheduler runs; later it is recorded as missed."
    )
    return Explanation(Reason.NOT_FIRED, sentence, False, **common)


def explain(facts: ExplainFacts) -> Explanation:
    """
    Whether the user got a message within ``facts.window`` of ``facts.at``, and why not.

    Among several candidates the one closest to the instant speaks: the message,
    else the recorded tick, else the cadence's expected tick.
    """
    lo, hi = facts.at - facts.window, facts.at + facts.window
    schedules = {s.id: s for s in facts.schedules}
    messages = [m for m in facts.messages if lo <= m.fire_at <= hi]
    message = _closest(messages, facts.at, lambda m: m.fire_at)
    if message is not None:
        schedule = schedules.get(message.schedule_id or "")
        zone = schedule.timezone if schedule else _user_zone(facts)
        return _message_story(message, zone, message.schedule_id)
    fires = [f for f in facts.fires if lo <= f.fire_at <= hi]
    fire = _closest(fires, facts.at, lambda f: f.fire_at)
    if fire is not None:
        return _fire_story(fire, schedules.get(fire.schedule_id), facts)
    stories = [
        story
        for schedule in facts.schedules
        if (story := _expected(schedule, facts, lo, hi)) is not None
    ]
    if stories:
        return stories[0]
    zone = _user_zone(facts)
    span = f"between {_when(lo, zone)} and {_when(hi, zone)}"
    deleted = [d for d in facts.deleted_schedules if d[1] <= hi]
    gone = (
        " ("
        + ", ".join(f"schedule {sid} was deleted at {_when(t, zone)}" for sid, t in deleted)
        + ")"
        if deleted
        else ""
    )
    if facts.schedules:
        names = ", ".join(f"{s.id} ({_describe(s)})" for s in facts.schedules[:3])
        sentence = (
            f"No: no schedule covered that time: none of the user's schedules ({names}) has "
            f"a tick {span}, and no wakeup or trigger event made a message then{gone}."
        )
        return Explanation(Reason.NOT_COVERED, sentence, False, timezone=zone)
    sentence = (
        f"No: the user has no schedule, and no wakeup or trigger event made a message {span}{gone}."
    )
    return Explanation(Reason.NO_SCHEDULE, sentence, False, timezone=zone)


def _describe(schedule: ScheduleFacts) -> str:
    cadence = json.loads(schedule.cadence_json)
    simple = cadence.get("simple") if isinstance(cadence, dict) else None
    if isinstance(simple, dict):
        times = ",".join(simple.get("times", [])) or f"every {simple.get('interval_hours')} h"
        text = f"{simple.get('frequency')} {times} {schedule.timezone}"
    else:
        cron = cadence.get("cron") if isinstance(cadence, dict) else cadence
        text = f"cron {cron} {schedule.timezone}"
    if schedule.active_window_json:
        text += f", window {window_text(json.loads(schedule.active_window_json))}"
    return text


def _user_zone(facts: ExplainFacts) -> str | None:
    """The zone of the user's most recently created schedule (``None``: UTC)."""
    latest = max(facts.schedules, key=lambda s: s.created_at, default=None)
    return latest.timezone if latest else None


__all__ = [
    "DEFAULT_WINDOW",
    "ExplainFacts",
    "Explanation",
    "FireFacts",
    "MessageFacts",
    "Reason",
    "ScheduleFacts",
    "explain",
    "parse_window",
    "zone_of",
]
