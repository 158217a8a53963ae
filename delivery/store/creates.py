"""
What the API's create writes (trigger events, wakeups, schedules) share: rows
as plain column values, and the pair-clock check folded into the write.

A route builds its row as a dict of every column, not a SQLModel row: building
a ``table=True`` model instance costs ~100 us (SQLModel's table construction
and the ORM's instrumented attribute sets), 7% of a trigger event POST's server
CPU, for a value that is dumped back to a dict for its insert anyway.

A wakeup or schedule created through the API is stamped on its (agent, user)
pair's clock (real now plus the pair's advance-time offset), so its route needs
the offset before it can build the row and the answer. Read on its own, that
offset was a pooled checkout and a round trip to SQLite's driver thread before
the write's own: ~9% of a keyed wakeup POST's server CPU
(``bench/bench_api_cost.py --profile``). Almost no pair is ever advanced, so the
route builds its write for the offset it expects (none) and the write checks it
first, in its own transaction (:func:`offset_guard`): the common case is one
call to the driver's thread, and a pair whose offset differs gets nothing
written and the offset found, to build again with.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlmodel import SQLModel

from delivery.store.advance import Pair
from delivery.store.common import owned_values
from delivery.store.idempotency import Guard, Recorded
from delivery.store.steps import SelectWhere
from delivery.store.tables import OFFSETS


@dataclass(frozen=True, slots=True)
class ExpectedOffset:
    """
    The pair's clock a write was built on.

    Attributes:
        pair: whose clock.
        offset_s: its offset in seconds (None or 0: not advanced).
    """

    pair: Pair
    offset_s: float | None = None


def offset_guard(expected: ExpectedOffset | None) -> Guard | None:
    """
    A guard (:func:`delivery.store.idempotency.recorded`) that refuses the write
    unless the pair's offset is still ``expected``'s; None without an expectation.
    """
    if expected is None:
        return None
    return _guarding(expected)


def _guarding(expected: ExpectedOffset) -> Guard:
    pair = expected.pair
    rows: list[dict[str, Any]] = yield SelectWhere(
        OFFSETS,
        owned_values(pair.project_id, agent_id=pair.agent_id, user_id=pair.user_id),
        columns=("offset_s",),
    )
    found = None if not rows else float(rows[0]["offset_s"])
    if (found or 0.0) == (expected.offset_s or 0.0):
        return None
    return Recorded(written=False, moved=True, offset_s=found)


def row_values(row: SQLModel | Mapping[str, Any]) -> Mapping[str, Any]:
    """The column values to insert for ``row`` (a SQLModel row, or the values themselves)."""
    return row.model_dump() if isinstance(row, SQLModel) else row
