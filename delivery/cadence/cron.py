"""
Parser for standard 5-field cron expressions with Vixie cron semantics.

Pure: no clock, no I/O. croniter is not used: it accepts non-standard syntax
(``L``, ``W``, ``#``, ``?``, seconds fields) that we must refuse.
"""

import re
from dataclasses import dataclass

from delivery.errors import InvalidCadenceError

_FIELD = "cadence.cron"
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_MAX_LENGTH = 256
# Longest day of each month; February counts 29 because leap years exist.
_MONTH_DAYS = (0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# One list item: "*", "*/step", "a", "a/step", "a-b", "a-b/step" where a and b are
# numbers or (month, day-of-week) names. "a/step" runs from a to the field's end, as
# in cronie, croniter and Quartz ("5/15" is "5-59/15").
_ITEM = re.compile(r"(?:(\*)|([0-9A-Za-z]+)(?:-([0-9A-Za-z]+))?)(?:/([0-9]+))?", re.ASCII)


@dataclass(frozen=True, slots=True)
class CronSpec:
    """
    A parsed cron expression.

    Attributes:
        minutes: allowed minutes (0-59), sorted.
        hours: allowed hours (0-23), sorted.
        doms: allowed days of the month (1-31).
        months: allowed months (1-12).
        dows: allowed days of the week, cron numbering (Sunday = 0).
        dom_star: the day-of-month field starts with ``*``.
        dow_star: the day-of-week field starts with ``*``.
        canonical: the expression with whitespace collapsed to single spaces.
    """

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    doms: frozenset[int]
    months: frozenset[int]
    dows: frozenset[int]
    dom_star: bool
    dow_star: bool
    canonical: str

    @property
    def day_and(self) -> bool:
        """
        Whether a day must match both day fields (else either one).

        Vixie cron: when either day field starts with ``*`` both must match
        (the starred one usually matches everything); when both are restricted,
        a day matching either fires ("0 9 1 * MON" = the 1st and every Monday).
        """
        return self.dom_star or self.dow_star


def _value(token: str, name: str, low: int, high: int, names: tuple[str, ...] | None) -> int:
    if token.isdigit():
        number = int(token)
    elif names is not None and token.upper() in names:
        # Month names count from 1 (JAN = 1), day names from 0 (SUN = 0): both from low.
        number = names.index(token.upper()) + low
    else:
        raise InvalidCadenceError(_FIELD, f"{_FIELD}: {name} field has an invalid value {token!r}")
    if not low <= number <= high:
        raise InvalidCadenceError(
            _FIELD, f"{_FIELD}: {name} value {number} is out of range {low}-{high}"
        )
    return number


def _field(
    text: str, name: str, low: int, high: int, names: tuple[str, ...] | None = None
) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        match = _ITEM.fullmatch(item)
        if match is None:
            raise InvalidCadenceError(
                _FIELD,
                f"{_FIELD}: {name} field item {item!r} is not standard cron "
                "(use *, a, a-b, */n, a/n or a-b/n)",
            )
        star, first, last, step_text = match.groups()
        if star:
            start, stop = low, high
        else:
            start = _value(first, name, low, high, names)
            if last is None and step_text is None:
                values.add(start)
                continue
            if last is None:
                # Day-of-week ends at Saturday (6), as in croniter: 7 is only an alias
                # for Sunday, and "1/2" meaning Mon, Wed, Fri and Sun would surprise.
                stop = max(6, start) if name == "day-of-week" else high
            else:
                stop = _value(last, name, low, high, names)
            if stop < start:
                hint = (
                    " (Sunday is 0 or 7: write 5-7, not FRI-SUN)" if name == "day-of-week" else ""
                )
                raise InvalidCadenceError(
                    _FIELD, f"{_FIELD}: {name} range {item!r} is reversed{hint}"
                )
        step = 1
        if step_text is not None:
            step = int(step_text)
            if not 1 <= step <= high - low + 1:
                raise InvalidCadenceError(
                    _FIELD,
                    f"{_FIELD}: {name} step in {item!r} must be between 1 and {high - low + 1}",
                )
        values.update(range(start, stop + 1, step))
    return values


def parse_cron(expression: str) -> CronSpec:
    """
    Parse a standard 5-field cron expression.

    Accepted: numbers, ``*``, lists, ranges, steps on ``*``, on ranges and on a
    start (``a/n`` is ``a-<last>/n``; day-of-week's last is 6, Saturday), month
    names ``JAN``-``DEC`` and day names ``SUN``-``SAT`` (any case, also in
    ranges), Sunday as 0 or 7. A step must be 1 up to the field's span; a
    range must not wrap (``FRI-SUN`` is reversed: write ``5-7``).

    Raises:
        InvalidCadenceError: anything else (``L``, ``W``, ``#``, ``?``,
            ``@daily``, 6 or 7 fields, reversed ranges, out-of-range values), or
            an expression that can never fire (``0 9 30 2 *``). The field is
            ``cadence.cron`` and the message names the cron field at fault.
    """
    # Messages echo the input, so refuse absurd lengths before anything else.
    if len(expression) > _MAX_LENGTH:
        raise InvalidCadenceError(
            _FIELD, f"{_FIELD} is longer than {_MAX_LENGTH} characters; not a 5-field cron"
        )
    parts = expression.split()
    if len(parts) != 5:
        raise InvalidCadenceError(
            _FIELD,
            f"{_FIELD} must have exactly 5 fields (minute hour day-of-month month "
            f"day-of-week); got {len(parts)}",
        )
    minute, hour, dom, month, dow = parts
    minutes = _field(minute, "minute", 0, 59)
    hours = _field(hour, "hour", 0, 23)
    doms = _field(dom, "day-of-month", 1, 31)
    months = _field(month, "month", 1, 12, _MONTHS)
    dows = {d % 7 for d in _field(dow, "day-of-week", 0, 7, _DAYS)}
    dom_star = dom.startswith("*")
    dow_star = dow.startswith("*")
    # When both day fields must match, every valid (month, day) pair falls on
    # every weekday in some year, so the expression fires iff one such pair exists.
    if (dom_star or dow_star) and not any(d <= _MONTH_DAYS[m] for m in months for d in doms):
        raise InvalidCadenceError(
            _FIELD,
            f"{_FIELD}: {expression!r} can never fire: no listed month has the "
            "listed day of the month",
        )
    return CronSpec(
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        doms=frozenset(doms),
        months=frozenset(months),
        dows=frozenset(dows),
        dom_star=dom_star,
        dow_star=dow_star,
        canonical=" ".join(parts),
    )
