"""
Inventory items under ``/api/v1/agents/{agentId}/users/{userId}/inventory``.

Only what schedules need: create, update (merge properties), get, delete. A
schedule reads its item live at every fire, so an update here shows up in the
next reminder. ``inventory_item_id`` and ``fact_id`` are the same id.
"""

import json
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from delivery.api.auth import ProjectId
from delivery.api.context import (
    AgentId,
    ApiContext,
    Ctx,
    ResourceId,
    UserId,
    check_label,
    parse_limit,
    utf8,
    wire_time,
)
from delivery.api.schemas import (
    MAX_PROPERTIES_BYTES,
    InventoryCreate,
    InventoryDirectOut,
    InventoryDirectUpdate,
    InventoryItemOut,
    InventoryWrite,
    InventoryWriteOut,
)
from delivery.errors import ConflictError, InvalidRequestError, NotFoundError
from delivery.store.common import canonical_json, new_id
from delivery.store.tables import InventoryItemRow

router = APIRouter(tags=["inventory"])
PREFIX = "/api/v1/agents/{agent_id}/users/{user_id}/inventory"


def _properties(value: dict[str, Any] | None) -> dict[str, Any]:
    props = value or {}
    if len(utf8(canonical_json(props), "properties")) > MAX_PROPERTIES_BYTES:
        raise InvalidRequestError(
            "properties", f"properties is larger than {MAX_PROPERTIES_BYTES // 1024} KiB as JSON"
        )
    return props


def _not_found(item_id: str) -> NotFoundError:
    return NotFoundError(
        "fact_id", f"fact_id {item_id!r}: no such inventory item", resource="inventory_item"
    )


def missing_item(agent_id: str, user_id: str, item_id: str) -> NotFoundError:
    """
    The 404 for a schedule or wakeup linking an item that does not exist: it names
    the item and says how to make one (ids are issued here, never chosen by clients).
    """
    path = PREFIX.format(agent_id=agent_id, user_id=user_id)
    return NotFoundError(
        "inventory_item_id",
        f"inventory_item_id {item_id!r}: no such inventory item for agent {agent_id!r} and "
        f'user {user_id!r}. Create it first (POST {path} with "action": "add", or POST '
        f"{path}/items; the SDK's inventory.create) and pass the inventory_item_id "
        "(fact_id) that answer returns.",
        resource="inventory_item",
    )


def _written(status: str, item_id: str, code: int = 200) -> JSONResponse:
    out = InventoryWriteOut(status=status, inventory_item_id=item_id, fact_id=item_id)
    return JSONResponse(out.model_dump(), status_code=code)


async def _add(
    ctx: ApiContext, project: str, agent: str, user: str, body: InventoryCreate
) -> JSONResponse:
    now = ctx.clock.now()
    row = InventoryItemRow(
        id=new_id("inv"),
        project_id=project,
        agent_id=agent,
        user_id=user,
        item_type=body.item_type,
        label=body.label,
        description=body.description,
        kb_node_id=body.kb_node_id,
        properties_json=canonical_json(_properties(body.properties)),
        created_at=now,
        updated_at=now,
    )
    await ctx.store.inventory.insert_item(row)
    return _written("added", row.id, 201)


@router.post(PREFIX + "/items", status_code=201, responses={201: {"model": InventoryWriteOut}})
async def create_item(
    agent_id: AgentId, user_id: UserId, body: InventoryCreate, project: ProjectId, ctx: Ctx
) -> Response:
    """Add an item; answers its id as both ``inventory_item_id`` and ``fact_id``."""
    return await _add(ctx, project, agent_id, user_id, body)


@router.post(PREFIX, responses={200: {"model": InventoryWriteOut}})
async def write_item(
    agent_id: AgentId, user_id: UserId, body: InventoryWrite, project: ProjectId, ctx: Ctx
) -> Response:
    """
    ``add`` creates an item. ``update`` / ``remove`` act on the one item of
    ``item_type`` that ``kb_node_id``, else ``label``, else ``description``
    identifies (404 when none, 409 when several).
    """
    if body.action == "add":
        return await _add(ctx, project, agent_id, user_id, body)
    properties = _properties(body.properties) if body.properties is not None else None
    items = await ctx.store.inventory.find_items(
        project, agent_id, user_id, item_type=body.item_type
    )
    for key in ("kb_node_id", "label", "description"):
        wanted = getattr(body, key)
        if wanted is not None:
            items = [i for i in items if getattr(i, key) == wanted]
            break
    if not items:
        raise NotFoundError(
            "item_type", f"no {body.item_type!r} item matches", resource="inventory_item"
        )
    if len(items) > 1:
        raise ConflictError(
            "item_type",
            f"{len(items)} {body.item_type!r} items match; use the item's fact_id "
            "(PUT …/inventory/{fact_id}) or a distinguishing kb_node_id / label",
        )
    item = items[0]
    if body.action == "remove":
        await ctx.store.inventory.delete_item(
            project, agent_id, user_id, item.id, now=ctx.clock.now()
        )
        return _written("removed", item.id)
    updated = await ctx.store.inventory.update_item(
        project, agent_id, user_id, item.id, properties=properties, fields={}, now=ctx.clock.now()
    )
    if updated is None:
        raise _not_found(item.id)
    return _written("updated", item.id)


def item_out(item: InventoryItemRow) -> InventoryItemOut:
    """The wire form of an item (beyond the SDK, which has no item model)."""
    return InventoryItemOut(
        inventory_item_id=item.id,
        fact_id=item.id,
        item_type=item.item_type,
        properties=json.loads(item.properties_json),
        created_at=wire_time(item.created_at),
        updated_at=wire_time(item.updated_at),
        label=item.label,
        description=item.description,
        kb_node_id=item.kb_node_id,
    )


@router.get(PREFIX)
async def query_items(
    agent_id: AgentId,
    user_id: UserId,
    project: ProjectId,
    ctx: Ctx,
    item_type: str | None = None,
    limit: str | None = None,
) -> Response:
    """
    The pair's items (oldest first, ``limit`` 1..1000, default 100) and a count per
    ``item_type`` in ``groups``: the SDK's ``inventory.query`` iterates only ``groups``.
    """
    count = parse_limit(limit, default=100, maximum=1000)
    wanted = check_label(item_type, "item_type") or None
    items = await ctx.store.inventory.find_items(project, agent_id, user_id, item_type=wanted)
    per_type: dict[str, int] = {}
    for item in items:
        per_type[item.item_type] = per_type.get(item.item_type, 0) + 1
    body = {
        "items": [item_out(i).model_dump(exclude_none=True) for i in items[:count]],
        "total_items": len(items),
        "groups": [{"group": t, "values": {"count": n}} for t, n in sorted(per_type.items())],
    }
    return JSONResponse(body)


@router.get(PREFIX + "/{fact_id}", responses={200: {"model": InventoryItemOut}})
async def get_item(
    agent_id: AgentId, user_id: UserId, fact_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """One item with its live properties (beyond the SDK, which has no single-item read)."""
    item = await ctx.store.inventory.get_item(project, agent_id, user_id, fact_id)
    if item is None:
        raise _not_found(fact_id)
    return JSONResponse(item_out(item).model_dump(exclude_none=True))


@router.put(PREFIX + "/{fact_id}", responses={200: {"model": InventoryDirectOut}})
async def direct_update(
    agent_id: AgentId,
    user_id: UserId,
    fact_id: ResourceId,
    body: InventoryDirectUpdate,
    project: ProjectId,
    ctx: Ctx,
) -> Response:
    """Merge ``properties`` into the item's (top-level keys replace; the Sonzai dosage example)."""
    updated = await ctx.store.inventory.update_item(
        project,
        agent_id,
        user_id,
        fact_id,
        properties=_properties(body.properties),
        fields={},
        now=ctx.clock.now(),
    )
    if updated is None:
        raise _not_found(fact_id)
    return JSONResponse(InventoryDirectOut(status="updated", fact_id=fact_id).model_dump())


@router.delete(PREFIX + "/{fact_id}", responses={200: {"model": InventoryDirectOut}})
async def direct_delete(
    agent_id: AgentId, user_id: UserId, fact_id: ResourceId, project: ProjectId, ctx: Ctx
) -> Response:
    """
    Delete an item; linked schedules keep firing without it. Idempotent: an unknown
    id answers the same (the SDK parses this body, so it is not a 204).
    """
    await ctx.store.inventory.delete_item(project, agent_id, user_id, fact_id, now=ctx.clock.now())
    return JSONResponse(InventoryDirectOut(status="deleted", fact_id=fact_id).model_dump())
