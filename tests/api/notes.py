"""Notification rows for tests: the dispatcher that normally writes them is another issue's."""

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.bulk import insert_notifications


def notification(
    project_id: str,
    agent_id: str,
    user_id: str,
    n: int,
    at: datetime,
    *,
    source_type: str = "schedule",
    event_type: str = "on_recurring_event_due",
) -> dict[str, Any]:
    """One ``NotificationRow`` mapping; ``n`` makes ids and times distinct and ordered."""
    source_id = {"schedule": f"fire_{n}", "wakeup": f"wk_{n}", "event": f"evt_{n}"}[source_type]
    created = at + timedelta(seconds=n)
    return {
        "id": f"msg_{project_id[-6:]}_{n}",
        "project_id": project_id,
        "agent_id": agent_id,
        "user_id": user_id,
        "source_type": source_type,
        "source_id": f"{source_id}_{project_id[-6:]}",
        "schedule_id": "sch_x" if source_type == "schedule" else None,
        "wakeup_id": source_id if source_type == "wakeup" else None,
        "trigger_event_id": source_id if source_type == "event" else None,
        "event_type": event_type,
        "check_type": "reminder",
        "intent": "check in" if n % 2 else "",
        "generated_message": f"hello {n}",
        "status": "pending",
        "error": None,
        "fire_at": created,
        "payload_json": json.dumps({"message_id": f"msg_{n}", "n": n}),
        "ack_status": "pending",
        "acknowledged_at": None,
        "created_at": created,
        "consumed_at": None,
    }


async def add_notifications(engine: AsyncEngine, rows: list[dict[str, Any]]) -> int:
    """Insert ``rows`` in one transaction; returns how many were new."""
    async with engine.begin() as conn:
        return await insert_notifications(conn, rows)
