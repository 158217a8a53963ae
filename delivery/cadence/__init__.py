"""
The cadence engine: a schedule and an instant in, fire instants out.

Pure: no clock, no I/O, no sqlmodel/nats/httpx imports. All wall-clock reasoning
happens in the schedule's own zone; inputs and outputs are aware UTC datetimes.

Usage::

    schedule = compile_schedule(cadence, active_window, starts_at=..., created_at=now, now=now)
    next_fire(schedule, now)          # first fire strictly after now, or None
    upcoming(schedule, now, 10)       # the preview list, active window applied
    ticks_between(schedule, a, b)     # every raw tick in (a, b], skipped ones included
"""

from delivery.cadence.compile import compile_schedule, compile_window
from delivery.cadence.engine import next_fire, ticks_between, upcoming
from delivery.cadence.instants import EARLIEST, LATEST, format_local, format_utc, parse_instant
from delivery.cadence.model import CompiledSchedule, SkipReason, Tick
from delivery.cadence.window import Window

__all__ = [
    "EARLIEST",
    "LATEST",
    "CompiledSchedule",
    "SkipReason",
    "Tick",
    "Window",
    "compile_schedule",
    "compile_window",
    "format_local",
    "format_utc",
    "next_fire",
    "parse_instant",
    "ticks_between",
    "upcoming",
]
