"""
The timeline's values: one event of a user's or a schedule's story, its order, the
opaque page cursor, and the sentences that say why a tick was skipped.

Pure: no clock, no I/O. The store (:mod:`delivery.store.timeline`) builds
:class:`TimelineEvent` values from the tables that record each fact; the API and
the CLI render them; :mod:`delivery.explain` reasons over them.
"""

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from delivery.cadence import SkipReason, format_local, format_utc
from delivery.errors import InvalidRequestError
from delivery.planning import BEFORE_PAIR_CLOCK, MISSED_MAX_LATENESS


class Kind(StrEnum):
    """What happened. The wire ``kind`` of a timeline entry."""

    SCHEDULE_CREATED = "schedule.created"
    SCHEDULE_UPDATED = "schedule.updated"
    SCHEDULE_DISABLED = "schedule.disabled"
    SCHEDULE_ENABLED = "schedule.enabled"
    SCHEDULE_DELETED = "schedule.deleted"
    SCHEDULE_ENDED = "schedule.ended"
    FIRE_FIRED = "fire.fired"
    FIRE_SKIPPED = "fire.skipped"
    WAKEUP_ACCEPTED = "wakeup.accepted"
    EVENT_ACCEPTED = "trigger_event.accepted"
    NOTIFICATION_COMPOSED = "notification.composed"
    NOTIFICATION_FAILED = "notification.failed_generation"
    NOTIFICATION_CONSUMED = "notification.consumed"
    WEBHOOK_ATTEMPT = "webhook.attempt"
    WEBHOOK_DEAD_LETTERED = "webhook.dead_lettered"
    CHANNEL_ATTEMPT = "channel.attempt"
    CHANNEL_FALLBACK = "channel.fallback"
    ENDPOINT_DISABLED = "webhook_endpoint.disabled"


class Order(StrEnum):
    """``asc``: oldest first; ``desc``: newest first."""

    ASC = "asc"
    DESC = "desc"


type EventKey = tuple[datetime, str, str]
"""(instant, source row id, kind): a total order, the same on every page."""


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """
    One entry of a timeline.

    Attributes:
        at: aware UTC instant the fact happened (a fire: its tick instant).
        kind: what happened.
        ref: the id of the row that records it (``fire_…``, ``msg_…``, ``whatt_…``);
            a row may record two events (an attempt and its dead letter), told
            apart by ``kind``.
        summary: one plain sentence.
        schedule_id: the schedule it belongs to, when it belongs to one.
        timezone: that schedule's IANA zone, when known.
        detail: the facts behind the sentence (status, reason, endpoint, ...).
    """

    at: datetime
    kind: Kind
    ref: str
    summary: str
    schedule_id: str | None = None
    timezone: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> EventKey:
        """The event's place in every timeline."""
        return (self.at, self.ref, self.kind.value)


def after_cursor(key: EventKey, cursor: EventKey | None, order: Order) -> bool:
    """Whether ``key`` comes after ``cursor`` in ``order`` (everything does without one)."""
    if cursor is None:
        return True
    return key > cursor if order is Order.ASC else key < cursor


def encode_cursor(key: EventKey, order: Order) -> str:
    """An opaque cursor for the page after ``key``."""
    at, ref, kind = key
    raw = json.dumps([format_utc(at), ref, kind, order.value], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, order: Order) -> EventKey:
    """
    The key a cursor from :func:`encode_cursor` stands for.

    Raises:
        InvalidRequestError: not one of ours, or made for the other ``order``.
    """
    bad = InvalidRequestError("cursor", "cursor must be a next_cursor from a previous page")
    if len(cursor) > 512 or not cursor.isascii():
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, ref, kind, made_for = json.loads(raw)
        parsed = datetime.fromisoformat(at.replace("Z", "+00:00"))
        # A naive instant would be read as the server's local time; one near year 1
        # overflows when converted. Neither comes from encode_cursor.
        if parsed.tzinfo is None:
            raise bad
        instant = parsed.astimezone(UTC)
    except (binascii.Error, ValueError, TypeError, AttributeError, OverflowError):
        raise bad from None
    if not (isinstance(ref, str) and isinstance(kind, str) and made_for in ("asc", "desc")):
        raise bad
    # Both are compared with stored values: printable ASCII only (a NUL, for one,
    # fails on PostgreSQL when the statement runs, not here).
    if not (0 < len(ref) <= 256 and ref.isascii() and ref.isprintable()):
        raise bad
    if not (0 < len(kind) <= 64 and kind.isascii() and kind.isprintable()):
        raise bad
    if made_for != order.value:
        raise InvalidRequestError(
            "cursor", f"cursor was made for order={made_for}; pass the same order to follow it"
        )
    return (instant, ref, kind)


def to_wire(event: TimelineEvent, zone: str, zone_source: str) -> dict[str, Any]:
    """
    One timeline entry as the API and the CLI show it: UTC, local time, the zone
    used and where it came from (``schedule``: the event's own; otherwise
    ``zone``/``zone_source``, the user's default).
    """
    if event.timezone:
        zone, zone_source = event.timezone, "schedule"
    out: dict[str, Any] = {
        "at": format_utc(event.at),
        "local_at": local_time(event.at, zone),
        "timezone": zone,
        "timezone_source": zone_source,
        "kind": event.kind.value,
        "summary": event.summary,
        "ref": event.ref,
        "detail": dict(event.detail),
    }
    if event.schedule_id:
        out["schedule_id"] = event.schedule_id
    return out


def zone_of(name: str | None) -> ZoneInfo:
    """The zone called ``name``, UTC when absent or unknown (a stored zone was validated)."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return ZoneInfo("UTC")


def local_time(at: datetime, zone_name: str | None) -> str:
    """``at`` in the zone, with its offset (``2027-03-14T09:00:00-04:00``)."""
    return format_local(at, zone_of(zone_name))


def gap_wall_time(fire_at: datetime, zone: ZoneInfo) -> datetime | None:
    """
    The wall time of a DST-gap tick, which does not exist in ``zone``.

    The cadence engine records such a tick at its ``fold=0`` instant, i.e. read with
    the offset in force before the jump, so adding that offset back gives the wall
    time. ``None`` when ``fire_at`` is not such an instant.
    """
    for back in (timedelta(hours=1), timedelta(hours=3), timedelta(days=1)):
        offset = (fire_at - back).astimezone(zone).utcoffset()
        if offset is None:
            continue
        wall = (fire_at + offset).replace(tzinfo=None)
        there = wall.replace(tzinfo=zone)
        if (
            there.astimezone(UTC) == fire_at
            and there.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != wall
        ):
            return wall
    return None


def window_text(window: Mapping[str, Any] | None) -> str:
    """An active window in words: ``mon, tue, wed, thu, fri 08:00-20:00``."""
    if not window:
        return "no window"
    parts = []
    days = window.get("days_of_week")
    if days:
        parts.append(", ".join(str(d) for d in days))
    hours = window.get("hours")
    if isinstance(hours, Mapping):
        parts.append(f"{hours.get('start')}-{hours.get('end')}")
    return " ".join(parts) or "no window"


def lateness_text(max_lateness: timedelta) -> str:
    """A duration in the largest whole unit that fits: ``1 h``, ``90 min``, ``45 s``."""
    seconds = int(max_lateness.total_seconds())
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def skip_rule(
    reason: str,
    fire_at: datetime,
    zone_name: str | None,
    active_window: Mapping[str, Any] | None,
    max_lateness: timedelta,
) -> str:
    """
    The rule that skipped a tick, as a sentence naming the time, the zone and the rule.

    The reasons are the ones the planner records (:mod:`delivery.planning` over
    :mod:`delivery.cadence`): the active window is checked first (the schedule's own
    filter), then the DST gap; a tick the scheduler reached more than the maximum
    lateness after it was due is ``missed_max_lateness``.
    """
    zone = zone_of(zone_name)
    where = zone.key
    if reason == SkipReason.DST_GAP:
        wall = gap_wall_time(fire_at, zone)
        if wall is not None:
            return (
                f"{wall:%H:%M} does not exist in {where} on {wall:%Y-%m-%d} "
                "(the clocks jump forward over it), so that tick was skipped"
            )
        return f"the tick fell in a daylight-saving gap in {where}, so it was skipped"
    local = fire_at.astimezone(zone)
    if reason == SkipReason.OUTSIDE_ACTIVE_WINDOW:
        return (
            f"{local:%H:%M} on {local:%A %Y-%m-%d} ({where}) is outside the active window "
            f"({window_text(active_window)}), so that tick was skipped"
        )
    if reason == MISSED_MAX_LATENESS:
        return (
            f"the tick due at {local:%H:%M} on {local:%Y-%m-%d} ({where}) was reached more than "
            f"the maximum lateness ({lateness_text(max_lateness)}) after it was due: the "
            "scheduler was down or behind, and a fire that late is recorded as missed, not sent"
        )
    if reason == BEFORE_PAIR_CLOCK:
        return (
            f"the tick at {local:%H:%M} on {local:%Y-%m-%d} ({where}) was already in the past "
            "of this agent and user's advanced clock when the schedule was created, so it "
            "was never due"
        )
    return f"the tick was skipped ({reason})"
