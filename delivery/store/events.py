"""Trigger events as the API accepts and lists them."""

from collections.abc import Mapping
from typing import Any, Protocol

from sqlalchemy import select

from delivery.store.bulk import insert_outbox
from delivery.store.common import StoreBase, owned
from delivery.store.tables import EVENTS, TriggerEventRow


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

    async def insert_event(self, row: TriggerEventRow, outbox: Mapping[str, Any]) -> None:
        """Insert the event and its ``event.accepted`` outbox message in one transaction."""
        async with self.write() as conn:
            await conn.execute(EVENTS.insert().values(**row.model_dump()))
            await insert_outbox(conn, [outbox])

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
