"""Shared pieces of the webhook tests: settings, seeded rows, and a recording receiver."""

import json
from datetime import datetime, timedelta
from typing import Any

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.settings import Settings
from delivery.store.bulk import insert_notifications
from delivery.store.webhooks import ATTEMPTS

SECRET_KEY = "webhook-tests-key"
EVENT = "on_wakeup_ready"


def webhook_settings(**overrides: Any) -> Settings:
    """Settings for the tests: a fixed at-rest key and loopback receivers allowed."""
    options: dict[str, Any] = {
        "subject_prefix": "test",
        "secret_key": SecretStr(SECRET_KEY),
        "webhook_allow_nets": "127.0.0.0/8",
        "webhook_timeout_s": 2.0,
    }
    options.update(overrides)
    return Settings(**options)


def notification_row(
    project_id: str, n: int, at: datetime, *, event_type: str = EVENT
) -> dict[str, Any]:
    """A pending notification with the webhook payload's shape."""
    nid = f"msg_{project_id[-6:]}_{n}"
    created = at + timedelta(seconds=n)
    payload = {
        "event_id": nid,
        "event_type": event_type,
        "created_at": created.isoformat(),
        "project_id": project_id,
        "agent_id": "agent-1",
        "user_id": "user-1",
        "message_id": nid,
        "source_type": "wakeup",
        "wakeup_id": f"wk_{n}",
        "check_type": "reminder",
        "intent": "check in",
        "generated_message": f"hello {n}",
        "fire_at": created.isoformat(),
        "fire_at_local": created.isoformat(),
        "metadata": {},
    }
    return {
        "id": nid,
        "project_id": project_id,
        "agent_id": "agent-1",
        "user_id": "user-1",
        "source_type": "wakeup",
        "source_id": f"wk_{project_id[-6:]}_{n}",
        "schedule_id": None,
        "wakeup_id": f"wk_{n}",
        "trigger_event_id": None,
        "event_type": event_type,
        "check_type": "reminder",
        "intent": "check in",
        "generated_message": f"hello {n}",
        "status": "pending",
        "error": None,
        "fire_at": created,
        "payload_json": json.dumps(payload, sort_keys=True, separators=(",", ":")),
        "ack_status": "pending",
        "acknowledged_at": None,
        "created_at": created,
        "consumed_at": None,
    }


async def add_notifications(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    """Insert notification rows as the dispatcher would."""
    async with engine.begin() as conn:
        await insert_notifications(conn, rows)


async def add_attempts(
    engine: AsyncEngine, project_id: str, event_type: str, count: int, at: datetime
) -> list[str]:
    """``count`` attempt rows for (project, event type); returns their ids, oldest first."""
    rows: list[dict[str, Any]] = [
        {
            "id": f"att_{project_id[-6:]}_{i}",
            "delivery_id": "whd_seeded",
            "project_id": project_id,
            "event_type": event_type,
            "event_id": f"msg_{i}",
            "attempt_number": i + 1,
            "webhook_url": "http://127.0.0.1:9/hook",
            "status": "failed" if i % 2 else "success",
            "response_code": 500 if i % 2 else 200,
            "duration_ms": 10 + i,
            "request_body": json.dumps({"event_id": f"msg_{i}"}),
            "response_body": "nope" if i % 2 else None,
            "error_message": "HTTP 500" if i % 2 else None,
            "created_at": at + timedelta(seconds=i),
        }
        for i in range(count)
    ]
    async with engine.begin() as conn:
        await conn.execute(ATTEMPTS.insert(), rows)
    return [r["id"] for r in rows]
