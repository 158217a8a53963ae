"""
RFC 3339 parsing and formatting of instants, for the wire and the CLI.

Pure: no clock, no I/O.
"""

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from delivery.errors import InvalidRequestError

# RFC 3339 section 5.6 date-time. The offset is mandatory: a naive timestamp is
# ambiguous and is refused rather than guessed. Lowercase t/z and a space
# separator are allowed by the RFC's notes, so we accept them too.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)


def format_utc(instant: datetime) -> str:
    """
    Render an aware instant as RFC 3339 UTC with ``Z``: ``2026-05-02T01:00:00Z``.

    Fractional seconds appear only when non-zero (fires never have them).

    Raises:
        ValueError: ``instant`` is naive.
    """
    if instant.tzinfo is None:
        raise ValueError("format_utc needs an aware datetime")
    utc = instant.astimezone(UTC)
    spec = "microseconds" if utc.microsecond else "seconds"
    return utc.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def format_local(instant: datetime, zone: ZoneInfo) -> str:
    """
    Render an aware instant in ``zone`` with its offset: ``2026-05-02T09:00:00+08:00``.

    Historic local-mean-time offsets with seconds (before ~1972) are printed as
    ``+06:55:25``, which RFC 3339 cannot express; no modern zone has them.

    Raises:
        ValueError: ``instant`` is naive.
    """
    if instant.tzinfo is None:
        raise ValueError("format_local needs an aware datetime")
    local = instant.astimezone(zone)
    spec = "microseconds" if local.microsecond else "seconds"
    return local.isoformat(timespec=spec)


def parse_instant(value: Any, field: str) -> datetime:
    """
    Parse an RFC 3339 timestamp with an offset (``Z`` or ``+hh:mm``) into aware UTC.

    Args:
        value: the raw JSON value the client sent.
        field: the dotted field name used in the error (``starts_at``).

    Returns:
        The instant as an aware datetime in UTC. More than six fractional
        digits are truncated to microseconds.

    Raises:
        InvalidRequestError: ``value`` is not a string, has no offset, or is
            not a real date and time; the message names ``field``.
    """
    example = "e.g. 2026-05-01T00:00:00Z"
    if not isinstance(value, str):
        raise InvalidRequestError(
            field, f"{field} must be an RFC 3339 timestamp string with an offset, {example}"
        )
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidRequestError(
            field,
            f"{field} must be an RFC 3339 timestamp with an offset (Z or +hh:mm), "
            f"{example}; got {value!r}",
        )
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    frac = match.group(7)
    micro = int((frac[1:] + "000000")[:6]) if frac else 0
    off = match.group(8)
    try:
        if off in ("Z", "z"):
            tz: timezone = UTC
        else:
            oh, om = int(off[1:3]), int(off[4:6])
            if oh > 23 or om > 59:
                raise ValueError("offset out of range")
            sign = -1 if off[0] == "-" else 1
            tz = timezone(sign * timedelta(hours=oh, minutes=om))
        parsed = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequestError(
            field, f"{field} is not a valid date and time: {value!r} ({example})"
        ) from None
