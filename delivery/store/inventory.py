"""
Inventory items: per-user facts (a plant, a subscription) that schedules link
to and messages show.
"""

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from delivery.bus.subjects import Subjects
from delivery.store.common import StoreBase, canonical_json, owned
from delivery.store.engine import Engine
from delivery.store.staging import restage_fires, staged_fires
from delivery.store.tables import FIRES, INVENTORY, SCHEDULES, InventoryItemRow


class Inventory(Protocol):
    """
    A user's inventory items.

    Invariants: a message shows its item as of the fire instant, so a change
    or a deletion restages the staged fires of the owner's schedules linked to
    the item, in the same transaction; two concurrent property merges both land.
    """

    async def insert_item(self, row: InventoryItemRow) -> None:
        """Insert a new inventory item."""
        ...

    async def get_item(
        self, project_id: str, agent_id: str, user_id: str, item_id: str
    ) -> InventoryItemRow | None:
        """One item of the (agent, user) pair, or ``None``."""
        ...

    async def find_items(
        self, project_id: str, agent_id: str, user_id: str, *, item_type: str | None
    ) -> list[InventoryItemRow]:
        """The pair's items, oldest first, optionally of one ``item_type``."""
        ...

    async def update_item(
        self,
        project_id: str,
        agent_id: str,
        user_id: str,
        item_id: str,
        *,
        properties: Mapping[str, Any] | None,
        fields: Mapping[str, Any],
        now: datetime,
    ) -> InventoryItemRow | None:
        """Merge ``properties`` and set ``fields``; ``None`` when the item does not exist."""
        ...

    async def delete_item(
        self, project_id: str, agent_id: str, user_id: str, item_id: str, *, now: datetime
    ) -> bool:
        """Delete one item; whether it existed."""
        ...


class InventoryStore(StoreBase):
    """
    :class:`Inventory` on SQLite and PostgreSQL.

    Args:
        engine: the store's engine (schema present).
        subjects: the deployment's subjects, for the restage messages.
    """

    def __init__(self, engine: Engine, *, subjects: Subjects) -> None:
        super().__init__(engine)
        self.subjects = subjects

    async def insert_item(self, row: InventoryItemRow) -> None:
        """Insert a new inventory item."""
        async with self.write() as conn:
            await conn.execute(INVENTORY.insert().values(**row.model_dump()))

    async def get_item(
        self, project_id: str, agent_id: str, user_id: str, item_id: str
    ) -> InventoryItemRow | None:
        """One item of the (agent, user) pair, or ``None``."""
        owner = owned(INVENTORY, project_id, agent_id=agent_id, user_id=user_id, id=item_id)
        async with self.read() as conn:
            row = (await conn.execute(select(INVENTORY).where(*owner))).one_or_none()
        return None if row is None else InventoryItemRow(**row._mapping)

    async def find_items(
        self, project_id: str, agent_id: str, user_id: str, *, item_type: str | None
    ) -> list[InventoryItemRow]:
        """The pair's items, oldest first, optionally of one ``item_type``."""
        conds = owned(INVENTORY, project_id, agent_id=agent_id, user_id=user_id)
        if item_type is not None:
            conds.append(INVENTORY.c.item_type == item_type)
        stmt = select(INVENTORY).where(*conds).order_by(INVENTORY.c.created_at, INVENTORY.c.id)
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [InventoryItemRow(**r._mapping) for r in rows]

    async def update_item(
        self,
        project_id: str,
        agent_id: str,
        user_id: str,
        item_id: str,
        *,
        properties: Mapping[str, Any] | None,
        fields: Mapping[str, Any],
        now: datetime,
    ) -> InventoryItemRow | None:
        """
        Merge ``properties`` into the item's (top-level keys replace) and set ``fields``.

        The read and the write share one transaction, so two concurrent merges
        both land.

        Returns:
            The updated item, or ``None`` when it does not exist in this pair.
        """
        owner = owned(INVENTORY, project_id, agent_id=agent_id, user_id=user_id, id=item_id)
        async with self.write() as conn:
            row = (
                await conn.execute(select(INVENTORY).where(*owner).with_for_update())
            ).one_or_none()
            if row is None:
                return None
            item = InventoryItemRow(**row._mapping)
            values: dict[str, Any] = {**fields, "updated_at": now}
            if properties is not None:
                merged = {**json.loads(item.properties_json), **properties}
                values["properties_json"] = canonical_json(merged)
            await conn.execute(update(INVENTORY).where(*owner).values(**values))
            await self._restage_item_fires(conn, now, project_id, agent_id, user_id, item_id)
        return item.model_copy(update=values)

    async def delete_item(
        self, project_id: str, agent_id: str, user_id: str, item_id: str, *, now: datetime
    ) -> bool:
        """Delete one item; schedules linked to it keep firing without it."""
        owner = owned(INVENTORY, project_id, agent_id=agent_id, user_id=user_id, id=item_id)
        async with self.write() as conn:
            result = await conn.execute(delete(INVENTORY).where(*owner))
            if result.rowcount:
                await self._restage_item_fires(conn, now, project_id, agent_id, user_id, item_id)
        return bool(result.rowcount)

    async def _restage_item_fires(
        self,
        conn: AsyncConnection,
        now: datetime,
        project_id: str,
        agent_id: str,
        user_id: str,
        item_id: str,
    ) -> None:
        # A message shows its item's properties as of the fire instant: the
        # staged fires of the owner's schedules that use the item are composed
        # again. Only the owner's schedules can read the item (its owner check).
        linked = select(SCHEDULES.c.id).where(
            *owned(SCHEDULES, project_id, agent_id=agent_id, user_id=user_id),
            SCHEDULES.c.inventory_item_id == item_id,
        )
        staged = staged_fires(now).where(FIRES.c.schedule_id.in_(linked.scalar_subquery()))
        await restage_fires(conn, staged, subjects=self.subjects, now=now)
