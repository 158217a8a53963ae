"""Trigger events as the API accepts and lists them."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select

from delivery.store.bulk import outbox_row
from delivery.store.common import StoreBase, owned
from delivery.store.creates import row_values
from delivery.store.engine import Engine
from delivery.store.idempotency import IdempotencyRecord, finding, recording
from delivery.store.steps import InsertIgnoring, InsertRows, Runner, Steps, inserting
from delivery.store.tables import EVENTS, OUTBOX, TriggerEventRow


@dataclass(frozen=True, slots=True)
class EventWrite:
    """
    One accepted event as :meth:`Events.accept_events` writes it.

    Attributes:
        row: the event (a row, or its column values: every column).
        outbox: its ``event.accepted`` outbox message.
        record: the ``Idempotency-Key`` record of the answer
            (:func:`delivery.store.idempotency.idempotency_row`), or None without a key.
    """

    row: TriggerEventRow | Mapping[str, Any]
    outbox: Mapping[str, Any]
    record: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EventOutcome:
    """
    What :meth:`Events.accept_events` did with one :class:`EventWrite`.

    Attributes:
        written: the event, its outbox message and its record were written.
        replay: when not written, the live record its key already had (answer
            from it); None when that record vanished meanwhile (a purge).
    """

    written: bool
    replay: IdempotencyRecord | None = None


class Events(Protocol):
    """
    A project's trigger events.

    Invariant: an accepted event and its ``event.accepted`` outbox message
    commit together, so an event the API acknowledged always reaches the
    dispatcher, and one it did not never does.
    """

    async def insert_event(self, row: TriggerEventRow, outbox: Mapping[str, Any]) -> None:
        """Insert the event and its outbox message in one transaction."""
        ...

    async def accept_events(
        self, writes: Sequence[EventWrite], now: datetime
    ) -> list[EventOutcome]:
        """
        Write many accepted events in ONE transaction, each with its outbox
        message and its idempotency record, unless its key already has a live
        record (``now`` decides which are live); one outcome per write, in order.

        Of two writes with one key, in this call or concurrent ones, only the
        first keeps its event; the other is answered from the first's record.
        All of it commits, or none (it raised).
        """
        ...

    async def list_events(
        self, project_id: str, agent_id: str, *, user_id: str | None, limit: int
    ) -> list[TriggerEventRow]:
        """The agent's trigger events, newest first."""
        ...


class EventStore(StoreBase):
    """:class:`Events` on SQLite and PostgreSQL."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # One call to SQLite's driver thread per operation (delivery.store.steps).
        self._runner = Runner(engine, reader=self._reader)

    async def insert_event(self, row: TriggerEventRow, outbox: Mapping[str, Any]) -> None:
        """Insert the event and its ``event.accepted`` outbox message in one transaction."""
        await self._runner.write(
            inserting(
                InsertRows(EVENTS, [row.model_dump()]),
                InsertIgnoring(OUTBOX, [outbox_row(outbox)], unique=("msg_id",)),
            )
        )

    async def accept_events(
        self, writes: Sequence[EventWrite], now: datetime
    ) -> list[EventOutcome]:
        """See :meth:`Events.accept_events`."""
        return await self._runner.write(_accepting(writes, now))

    async def list_events(
        self, project_id: str, agent_id: str, *, user_id: str | None, limit: int
    ) -> list[TriggerEventRow]:
        """The agent's trigger events, newest first."""
        stmt = (
            select(EVENTS)
            .where(*owned(EVENTS, project_id, agent_id=agent_id, user_id=user_id))
            .order_by(EVENTS.c.created_at.desc(), EVENTS.c.id.desc())
            .limit(limit)
        )
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [TriggerEventRow(**r._mapping) for r in rows]


def _accepting(writes: Sequence[EventWrite], now: datetime) -> Steps[list[EventOutcome]]:
    """
    Record each write's key first (its key's live record wins), then insert the
    events and outbox messages of the recorded ones in two multi-row statements.
    """
    outcomes: list[EventOutcome] = [EventOutcome(written=True)] * len(writes)
    # Keys are recorded in key order (stable: among repeats of one key the first
    # to arrive wins), so two replicas' batches sharing keys lock their rows in
    # one order on PostgreSQL instead of deadlocking.
    keyed = sorted(
        ((i, w.record) for i, w in enumerate(writes) if w.record is not None),
        key=lambda pair: (pair[1]["project_id"], pair[1]["route"], pair[1]["key"]),
    )
    for i, record in keyed:
        inserted: int = yield from recording(record, now)
        if inserted != 1:
            # The key's record, committed earlier or written by a write before
            # this one in the batch: answer from it.
            replay = yield from finding(record["project_id"], record["route"], record["key"], now)
            outcomes[i] = EventOutcome(written=False, replay=replay)
    kept = [w for w, outcome in zip(writes, outcomes, strict=True) if outcome.written]
    if kept:
        yield InsertRows(EVENTS, [row_values(w.row) for w in kept])
        yield InsertIgnoring(OUTBOX, [outbox_row(w.outbox) for w in kept], unique=("msg_id",))
    return outcomes
