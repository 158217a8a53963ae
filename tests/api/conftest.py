"""
Fast in-process API fixtures: the app over ``engine`` (both databases) through httpx's
ASGITransport, with two projects (``alpha``, ``beta``) and a manual clock.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.clock import ManualClock
from delivery.settings import Settings
from delivery.store.sql import SqlStore

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)


@dataclass
class Api:
    """Two tenants' clients over one app."""

    store: SqlStore
    clock: ManualClock
    alpha: httpx.AsyncClient
    beta: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    projects: dict[str, str]


@pytest.fixture
async def api(engine: AsyncEngine) -> AsyncIterator[Api]:
    """The API in-process, on a schema made from the metadata."""
    clock = ManualClock(START)
    store = SqlStore(engine)
    projects: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name in ("alpha", "beta"):
        project = await store.keys.ensure_project(name, START)
        projects[name] = project.id
        keys[name] = await store.keys.create_api_key(project.id, START)
    app = create_app(Settings(subject_prefix="test"), store, clock)
    transport = httpx.ASGITransport(app=app)

    def client(key: str | None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(transport=transport, base_url="http://api.test", headers=headers)

    async with client(keys["alpha"]) as alpha, client(keys["beta"]) as beta, client(None) as anon:
        yield Api(store, clock, alpha, beta, anon, projects)
