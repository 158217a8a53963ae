"""Trigger events as the API accepts and lists them."""

from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import select

from delivery.store.bulk import outbox_row
from delivery.store.common import StoreBase, owned
from delivery.store.engine import Engine
from delivery.store.steps import InsertIgnoring, InsertRows, Runner, inserting
from delivery.store.tables import EVENTS, OUTBOX, TriggerEventRow


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
