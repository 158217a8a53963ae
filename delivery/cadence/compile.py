"""
Validation of a raw schedule body and compilation into a :class:`CompiledSchedule`.

Pure: no clock (``now`` is passed in), no I/O. Inputs are raw JSON values
exactly as a client sent them, so every wrong type becomes a clean
:class:`~delivery.errors.BadRequestError` naming the field.
"""

import re
import zoneinfo
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from delivery.cadence.cron import parse_cron
from delivery.cadence.model import CompiledSchedule
from delivery.cadence.window import Window, in_hours
from delivery.errors import (
    CadenceTooDenseError,
    CadenceTooFrequentError,
    InvalidActiveWindowError,
    InvalidCadenceError,
    InvalidRequestError,
    InvalidTimezoneError,
    InvalidWindowError,
)

# Seeds 001 "Rate limits": more than 96 raw ticks per 24 hours is too dense.
MAX_TICKS_PER_DAY = 96

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = Python weekday()
_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])", re.ASCII)
_FREQUENCIES = ("daily", "weekly", "interval_hours")
_SIMPLE_KEYS = {
    "daily": {"frequency", "times"},
    "weekly": {"frequency", "times", "days_of_week"},
    "interval_hours": {"frequency", "interval_hours"},
}
_MINUTE = timedelta(minutes=1)


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    # The pinned tzdata package's list (delivery.tz empties TZPATH). Membership
    # is exact, so "asia/singapore" or "+08:00" never reach ZoneInfo, whose
    # lookup could be case-insensitive on some filesystems.
    return frozenset(zoneinfo.available_timezones())


def _timezone(cadence: dict[str, Any]) -> tuple[str, zoneinfo.ZoneInfo]:
    field = "cadence.timezone"
    name = cadence.get("timezone")
    if name is None:
        raise InvalidTimezoneError(
            field, f"{field} is required: an IANA zone name such as 'Asia/Singapore'"
        )
    if not isinstance(name, str):
        raise InvalidTimezoneError(field, f"{field} must be a string IANA zone name")
    if name not in _zone_names():
        raise InvalidTimezoneError(
            field,
            f"{field} {name[:64]!r} is not an IANA zone name (names are case-sensitive, "
            "e.g. 'Asia/Singapore'; offsets like '+08:00' are not accepted)",
        )
    return name, zoneinfo.ZoneInfo(name)


def _clock_time(
    value: Any, field: str, error: type[InvalidCadenceError] | type[InvalidActiveWindowError]
) -> int:
    """A 24-hour ``HH:MM`` string as minutes after midnight."""
    if not isinstance(value, str) or (match := _TIME.fullmatch(value)) is None:
        raise error(field, f"{field} must be a 24-hour time 'HH:MM' (00:00-23:59); got {value!r}")
    return int(match.group(1)) * 60 + int(match.group(2))


def _format_minute(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _weekdays(
    value: Any, field: str, error: type[InvalidCadenceError] | type[InvalidActiveWindowError]
) -> list[int]:
    """A list of ``mon``..``sun`` tokens as Python weekdays, in the client's order."""
    if not isinstance(value, list):
        raise error(field, f"{field} must be a list of 'mon'..'sun'")
    if not value:
        raise error(field, f"{field} must not be empty (omit it to allow every day)")
    days = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or item not in _WEEKDAYS:
            raise error(
                f"{field}[{i}]",
                f"{field}[{i}] must be one of {', '.join(_WEEKDAYS)} (lowercase); got {item!r}",
            )
        days.append(_WEEKDAYS.index(item))
    return days


def _simple(simple: Any) -> tuple[dict[str, Any], list[int], list[int], int | None]:
    """Validate ``cadence.simple``: (normalised, minutes, weekdays, interval hours)."""
    base = "cadence.simple"
    if not isinstance(simple, dict):
        raise InvalidCadenceError(base, f"{base} must be an object")
    frequency = simple.get("frequency")
    if frequency not in _FREQUENCIES:
        raise InvalidCadenceError(
            f"{base}.frequency",
            f"{base}.frequency must be one of {', '.join(_FREQUENCIES)}; got {frequency!r}",
        )
    allowed = _SIMPLE_KEYS[frequency]
    for key in simple:
        if key not in allowed:
            raise InvalidCadenceError(
                f"{base}.{key}", f"{base}.{key} is not allowed for frequency {frequency!r}"
            )
    if frequency == "interval_hours":
        field = f"{base}.interval_hours"
        raw = simple.get("interval_hours")
        # JSON has one number type: 4.0 is 4, but 1.5 or true are not hours.
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= 24:
            raise InvalidCadenceError(
                field, f"{field} must be a whole number of hours from 1 to 24; got {raw!r}"
            )
        return {"frequency": frequency, "interval_hours": raw}, [], list(range(7)), raw
    field = f"{base}.times"
    times = simple.get("times")
    if not isinstance(times, list) or not times:
        raise InvalidCadenceError(field, f"{field} must be a non-empty list of 'HH:MM' times")
    minutes = [_clock_time(t, f"{field}[{i}]", InvalidCadenceError) for i, t in enumerate(times)]
    seen: set[int] = set()
    for i, minute in enumerate(minutes):
        if minute in seen:
            raise CadenceTooFrequentError(
                f"{field}[{i}]",
                f"{field}[{i}] repeats {_format_minute(minute)}: more than one fire per minute",
            )
        seen.add(minute)
    normal: dict[str, Any] = {
        "frequency": frequency,
        "times": [_format_minute(m) for m in sorted(minutes)],
    }
    days = list(range(7))
    if frequency == "weekly":
        dfield = f"{base}.days_of_week"
        if "days_of_week" not in simple:
            raise InvalidCadenceError(dfield, f"{dfield} is required for frequency 'weekly'")
        days = _weekdays(simple["days_of_week"], dfield, InvalidCadenceError)
        if len(set(days)) != len(days):
            raise CadenceTooFrequentError(
                dfield, f"{dfield} repeats a day: more than one fire per minute"
            )
        normal["days_of_week"] = [_WEEKDAYS[d] for d in sorted(days)]
    return normal, sorted(minutes), days, None


def _window(active_window: Any) -> tuple[dict[str, Any] | None, int | None, int | None, set[int]]:
    """Validate ``active_window``: (normalised or None, start, end, allowed weekdays)."""
    base = "active_window"
    every_day = set(range(7))
    if active_window is None:
        return None, None, None, every_day
    if not isinstance(active_window, dict):
        raise InvalidActiveWindowError(base, f"{base} must be an object")
    for key in active_window:
        if key not in ("hours", "days_of_week"):
            raise InvalidActiveWindowError(
                f"{base}.{key}", f"{base}.{key} is not a field (use hours and days_of_week)"
            )
    normal: dict[str, Any] = {}
    start = end = None
    hours = active_window.get("hours")
    if hours is not None:
        hfield = f"{base}.hours"
        if not isinstance(hours, dict):
            raise InvalidActiveWindowError(hfield, f"{hfield} must be an object with start, end")
        for key in hours:
            if key not in ("start", "end"):
                raise InvalidActiveWindowError(
                    f"{hfield}.{key}", f"{hfield}.{key} is not a field (use start and end)"
                )
        for key in ("start", "end"):
            if key not in hours:
                raise InvalidActiveWindowError(f"{hfield}.{key}", f"{hfield}.{key} is required")
        start = _clock_time(hours["start"], f"{hfield}.start", InvalidActiveWindowError)
        end = _clock_time(hours["end"], f"{hfield}.end", InvalidActiveWindowError)
        if start == end:
            raise InvalidActiveWindowError(
                f"{hfield}.end",
                f"{hfield}.end equals {hfield}.start: the window would be empty "
                "(omit hours to allow the whole day)",
            )
        normal["hours"] = {"start": _format_minute(start), "end": _format_minute(end)}
    days = every_day
    raw_days = active_window.get("days_of_week")
    if raw_days is not None:
        # Explicit [] is rejected: it could never fire.
        day_list = _weekdays(raw_days, f"{base}.days_of_week", InvalidActiveWindowError)
        days = set(day_list)
        normal["days_of_week"] = [_WEEKDAYS[d] for d in sorted(days)]
    # {} and {"hours": null} mean "no window" (PATCH uses {} to clear it).
    return (normal or None), start, end, days


def _aware(value: Any, field: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidRequestError(field, f"{field} must be an aware datetime")
    return value.astimezone(UTC)


def _ceil_minute(instant: datetime) -> datetime:
    floor = instant.replace(second=0, microsecond=0)
    return floor if floor == instant else floor + _MINUTE


def compile_schedule(
    cadence: Any,
    active_window: Any = None,
    *,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    created_at: datetime,
    now: datetime | None = None,
) -> CompiledSchedule:
    """
    Validate a schedule body and compile it for fast next-fire computation.

    Semantics (all wall-clock reasoning in ``cadence.timezone``):

    * ``simple`` ``daily``: every listed ``HH:MM`` of every calendar day;
      ``weekly``: the same on the listed days; ``interval_hours`` (1..24): every
      N hours of *elapsed* time from the anchor (``starts_at``, else
      ``created_at``, rounded up to the whole minute). Because it counts
      elapsed time, its local wall times shift by the DST offset change (a
      4-hourly 08:00 becomes 09:00 or 07:00), and at a fall-back both
      occurrences of a wall time can fire: they are distinct instants.
    * ``cron``: 5 fields, Vixie semantics (see :mod:`delivery.cadence.cron`).
    * The order of ``times`` and ``days_of_week`` does not matter; the
      normalised objects list them sorted (days Monday first).
    * Limits (the Sonzai rate limits): a repeated time or day is ``CADENCE_TOO_FREQUENT``;
      more than 96 raw ticks per 24 hours is ``CADENCE_TOO_DENSE``, counted on
      the wall-clock grid (ticks per allowed local day), so a 23- or 25-hour
      DST day does not change the verdict: ``*/15 * * * *`` (96) passes.
    * A window that filters out every tick compiles (the engine has no next
      fire for it); the API refuses such a schedule, naming ``active_window``.
    * JSON ``null`` for an optional key means "absent" (``"cron": null`` next
      to ``simple`` is fine); a repeated day in the window's ``days_of_week``
      is harmless and dropped, unlike one in a weekly cadence.
    * Window ``hours`` needs both ``start`` and ``end``; ``days_of_week`` alone
      or ``hours`` alone are both fine.

    Args:
        cadence: the raw ``cadence`` object.
        active_window: the raw ``active_window`` object; ``None`` or ``{}``
            means no window.
        starts_at: inclusive lower bound (aware).
        ends_at: exclusive upper bound (aware).
        created_at: the schedule's creation instant (aware); anchors
            ``interval_hours`` when ``starts_at`` is absent.
        now: when given, an ``ends_at`` at or before it is rejected.

    Returns:
        The compiled schedule.

    Raises:
        InvalidTimezoneError: missing, non-string or unknown zone (field
            ``cadence.timezone``).
        InvalidCadenceError: both or neither of ``simple``/``cron``, unknown
            frequency, fields of another frequency, bad times, bad cron.
        InvalidActiveWindowError: bad window times, ``start == end``, empty or
            bad ``days_of_week``, unknown keys.
        InvalidWindowError: ``ends_at <= starts_at`` or ``ends_at <= now``.
        CadenceTooFrequentError: more than one fire per minute.
        CadenceTooDenseError: more than 96 raw ticks per 24 hours.
        InvalidRequestError: a naive ``starts_at``/``ends_at``/``created_at``.
    """
    shape = _shape(cadence, active_window)
    start_bound = _aware(starts_at, "starts_at")
    end_bound = _aware(ends_at, "ends_at")
    created = _aware(created_at, "created_at")
    if created is None:
        raise InvalidRequestError("created_at", "created_at is required")
    now_utc = _aware(now, "now")
    if end_bound is not None:
        if start_bound is not None and end_bound <= start_bound:
            raise InvalidWindowError("ends_at", "ends_at must be after starts_at")
        if now_utc is not None and end_bound <= now_utc:
            raise InvalidWindowError(
                "ends_at", "ends_at is already in the past: the schedule could never fire"
            )
    anchor = _ceil_minute(start_bound if start_bound is not None else created)

    # Each schedule gets its own normalised objects: the shape is shared.
    # (Spelt out: ``dataclasses.replace`` took half of a cached compile.)
    return CompiledSchedule(
        cadence=_copied(shape.cadence),
        active_window=None if shape.active_window is None else _copied(shape.active_window),
        cadence_type=shape.cadence_type,
        timezone=shape.timezone,
        zone=shape.zone,
        starts_at=start_bound,
        ends_at=end_bound,
        anchor=anchor,
        _interval=shape._interval,
        _minutes=shape._minutes,
        _fire_minutes=shape._fire_minutes,
        _month_ok=shape._month_ok,
        _dom_ok=shape._dom_ok,
        _dow_ok=shape._dow_ok,
        _day_and=shape._day_and,
        _every_day=shape._every_day,
        _window_start=shape._window_start,
        _window_end=shape._window_end,
        _window_days=shape._window_days,
        _never=shape._never,
    )


def _shape(cadence: Any, active_window: Any) -> CompiledSchedule:
    """
    What :func:`compile_schedule` makes of ``cadence`` and ``active_window`` alone
    (no bounds, no anchor), from a cache when the same values were compiled before.

    Validating and compiling a cadence was ~5% of a schedule POST's server CPU
    (``bench/bench_api_cost.py --profile``), for bodies that mostly repeat (one
    daily time in one zone). The cache is keyed by the values' exact shape, types
    included (``true`` is not ``1``, nor ``4.0`` ``4``): an entry only ever
    answers the values that made it. A refused body raises every time (nothing is
    cached for it).
    """
    key = _frozen((cadence, active_window))
    if key is None:
        return _compile_shape(cadence, active_window)
    return _cached_shape(key)


@lru_cache(maxsize=1024)
def _cached_shape(key: object) -> CompiledSchedule:
    # Compiled from the values the key holds, which are equal to the caller's.
    cadence, active_window = _thawed(key)
    return _compile_shape(cadence, active_window)


_SCALARS: dict[type, str] = {str: "s", int: "i", float: "f", bool: "b", type(None): "n"}


def _frozen(value: Any) -> object | None:
    """
    A hashable key equal only for values of the same JSON shape and types, or None
    for anything else (not cached). Each scalar is tagged with its type, as
    ``True == 1`` and ``1 == 1.0`` in Python.
    """
    kind = _SCALARS.get(type(value))
    if kind is not None:
        return (kind, value)
    if type(value) is dict:
        items = []
        for name, item in value.items():
            frozen = _frozen(item)
            if type(name) is not str or frozen is None:
                return None
            items.append((name, frozen))
        return ("d", tuple(items))
    if type(value) in (list, tuple):
        parts = []
        for item in value:
            frozen = _frozen(item)
            if frozen is None:
                return None
            parts.append(frozen)
        return ("l" if type(value) is list else "t", tuple(parts))
    return None


def _thawed(key: Any) -> Any:
    """The values :func:`_frozen` made ``key`` of."""
    kind, held = key
    if kind == "d":
        return {name: _thawed(item) for name, item in held}
    if kind == "l":
        return [_thawed(item) for item in held]
    if kind == "t":
        return tuple(_thawed(item) for item in held)
    return held


def _copied(value: Any) -> Any:
    """A copy of a normalised object (dicts, lists and scalars)."""
    if type(value) is dict:
        return {name: _copied(item) for name, item in value.items()}
    if type(value) is list:
        return [_copied(item) for item in value]
    return value


def _compile_shape(cadence: Any, active_window: Any) -> CompiledSchedule:
    """:func:`_shape` without the cache: validate and compile the two values."""
    if not isinstance(cadence, dict):
        raise InvalidCadenceError(
            "cadence", "cadence must be an object with simple or cron and timezone"
        )
    for key in cadence:
        if key not in ("simple", "cron", "timezone"):
            raise InvalidCadenceError(
                f"cadence.{key}", f"cadence.{key} is not a field (use simple or cron, and timezone)"
            )
    timezone_name, zone = _timezone(cadence)
    has_simple = cadence.get("simple") is not None
    has_cron = cadence.get("cron") is not None
    if has_simple == has_cron:
        raise InvalidCadenceError("cadence", "cadence must have exactly one of simple or cron")

    interval_hours: int | None = None
    month_ok: tuple[bool, ...] = (True,) * 13
    dom_ok: tuple[bool, ...] = (True,) * 32
    dow_ok: tuple[bool, ...] = (True,) * 7
    day_and = True
    minutes: list[int] = []
    normal: dict[str, Any]
    if has_simple:
        cadence_type = "simple"
        simple_normal, minutes, days, interval_hours = _simple(cadence["simple"])
        dow_ok = tuple(d in days for d in range(7))
        normal = {"simple": simple_normal, "timezone": timezone_name}
    else:
        cadence_type = "cron"
        expression = cadence["cron"]
        if not isinstance(expression, str):
            raise InvalidCadenceError("cadence.cron", "cadence.cron must be a string")
        spec = parse_cron(expression)
        minutes = [h * 60 + m for h in spec.hours for m in spec.minutes]
        month_ok = tuple(m in spec.months for m in range(13))
        dom_ok = tuple(d in spec.doms for d in range(32))
        # Cron counts Sunday = 0; Python's weekday() has Monday = 0.
        dow_ok = tuple((d + 1) % 7 in spec.dows for d in range(7))
        day_and = spec.day_and
        normal = {"cron": spec.canonical, "timezone": timezone_name}

    if len(minutes) > MAX_TICKS_PER_DAY:
        field = "cadence.cron" if cadence_type == "cron" else "cadence.simple.times"
        raise CadenceTooDenseError(
            field,
            f"{field} makes {len(minutes)} ticks per day; at most {MAX_TICKS_PER_DAY} per "
            "24 hours are allowed (counted before the active window)",
        )

    window_normal, window_start, window_end, window_days = _window(active_window)
    window_days_ok = tuple(d in window_days for d in range(7))
    fire_minutes = tuple(
        tuple(m for m in minutes if in_hours(m, window_start, window_end))
        if window_days_ok[wd]
        else ()
        for wd in range(7)
    )
    # A weekday can carry a fire when the window keeps some minute on it and the
    # day rule can land on it. Every valid (month, day) pair falls on every
    # weekday in some year, so only AND mode's day-of-week set limits weekdays.
    never = interval_hours is None and not any(
        fire_minutes[wd] and (not day_and or dow_ok[wd]) for wd in range(7)
    )

    return CompiledSchedule(
        cadence=normal,
        active_window=window_normal,
        cadence_type=cadence_type,
        timezone=timezone_name,
        zone=zone,
        starts_at=None,
        ends_at=None,
        anchor=_EPOCH,
        _interval=timedelta(hours=interval_hours) if interval_hours is not None else None,
        _minutes=tuple(minutes),
        _fire_minutes=fire_minutes,
        _month_ok=month_ok,
        _dom_ok=dom_ok,
        _dow_ok=dow_ok,
        _day_and=day_and,
        _every_day=all(month_ok[1:]) and all(dom_ok[1:]) and all(dow_ok),
        _window_start=window_start,
        _window_end=window_end,
        _window_days=window_days_ok,
        _never=never,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""The anchor of a shape: every schedule made from it gets its own."""


def compile_window(active_window: Any, timezone: str) -> Window | None:
    """
    A stored schedule's active window as a :class:`Window` in its zone, or ``None``
    (no window). Validated as :func:`compile_schedule` validates it.
    """
    normal, start, end, days = _window(active_window)
    if normal is None:
        return None
    return Window(zoneinfo.ZoneInfo(timezone), start, end, tuple(d in days for d in range(7)))
