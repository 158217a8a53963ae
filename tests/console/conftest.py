"""
The console over the real app: two projects (``alpha``, ``beta``) on both databases, a
manual clock, and a signed-in browser-like client (cookies kept, CSRF token read from
the page as a browser's form would send it).
"""

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.clock import ManualClock
from delivery.store.sql import SqlStore
from tests.webhooks.helpers import webhook_settings

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
A, U = "agent_c", "user_c"
USER = f"/api/v1/agents/{A}/users/{U}"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Rig:
    """The app, its clock and store, the projects' keys and API clients."""

    app: FastAPI
    engine: AsyncEngine
    store: SqlStore
    clock: ManualClock
    keys: dict[str, str]
    projects: dict[str, str]
    alpha: httpx.AsyncClient
    beta: httpx.AsyncClient

    def browser(self) -> httpx.AsyncClient:
        """A client with no credentials of its own: a browser before sign-in."""
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://console.test"
        )


def csrf_of(page: str) -> str:
    """The CSRF token a page's forms carry."""
    found = CSRF.search(page)
    assert found, "no CSRF token on the page"
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    """Sign in as a browser would: load the form, post it with its token."""
    form = await client.get("/console/sign-in")
    return await client.post(
        "/console/sign-in",
        data={"csrf": csrf_of(form.text), "api_key": key, "next": "/console/users"},
    )


async def create_schedule(client: httpx.AsyncClient, **body: Any) -> str:
    """A weekday schedule with an active window (03:00 is always skipped)."""
    payload: dict[str, Any] = {
        "intent": "check in",
        "check_type": "reminder",
        "cadence": {
            "simple": {
                "frequency": "weekly",
                "days_of_week": ["mon", "tue", "wed", "thu", "fri"],
                "times": ["03:00", "08:30"],
            },
            "timezone": "Europe/London",
        },
        "active_window": {"hours": {"start": "07:00", "end": "21:00"}},
    } | body
    response = await client.post(f"{USER}/schedules", json=payload)
    assert response.status_code == 201, response.text
    return str(response.json()["schedule_id"])


async def advance(client: httpx.AsyncClient, hours: float) -> None:
    """Fire the user's schedules through ``hours`` of simulated time (advance-time)."""
    response = await client.post(
        "/api/v1/workbench/advance-time",
        json={"agent_id": A, "user_id": U, "simulated_hours": hours},
    )
    assert response.status_code == 200, response.text


@pytest.fixture
async def rig(engine: AsyncEngine) -> AsyncIterator[Rig]:
    """The app in-process on both databases, with two projects and their API clients."""
    clock = ManualClock(START)
    store = SqlStore(engine)
    projects: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name in ("alpha", "beta"):
        project = await store.keys.ensure_project(name, START)
        projects[name] = project.id
        keys[name] = await store.keys.create_api_key(project.id, START)
    app = create_app(webhook_settings(), store, clock)
    transport = httpx.ASGITransport(app=app)

    def client(key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=transport,
            base_url="http://api.test",
            headers={"Authorization": f"Bearer {key}"},
        )

    async with client(keys["alpha"]) as alpha, client(keys["beta"]) as beta:
        yield Rig(app, engine, store, clock, keys, projects, alpha, beta)
