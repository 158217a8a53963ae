"""
Stored schedules read back as the cadence engine's values.

The API, the scheduler and advance-time all recompile a stored schedule; they
must do it the same way, or ``upcoming`` and the fires disagree (for an
every-N-hours cadence the anchor decides every fire).
"""

import json
from collections.abc import Mapping
from functools import partial
from typing import Any

from delivery.cadence import CompiledSchedule, compile_schedule


def compile_stored(row: Any) -> CompiledSchedule:
    """
    Recompile a stored (already validated) schedule row.

    Args:
        row: a ``schedules`` row as a mapping (``RowMapping``) or with attributes
            (``Row``, ``ScheduleRow``).

    The stored ``anchor_at`` is the compiled anchor (``starts_at``, else the
    creation instant, rounded up to the minute), so passing it as the creation
    instant gives back the same anchor whatever edited the row since.
    """
    get = row.__getitem__ if isinstance(row, Mapping) else partial(getattr, row)
    cadence = json.loads(get("cadence_json"))
    if isinstance(cadence, dict) and "timezone" not in cadence:
        cadence = {**cadence, "timezone": get("timezone")}
    window_json = get("active_window_json")
    return compile_schedule(
        cadence,
        json.loads(window_json) if window_json else None,
        starts_at=get("starts_at"),
        ends_at=get("ends_at"),
        created_at=get("anchor_at"),
    )
