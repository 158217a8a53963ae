"""
Fixtures for the channels tests: the API in-process over ``engine`` (both
databases) with two projects, settings that let webhooks reach 127.0.0.1, and a data
folder for the secret key; and the provider stand-ins of ``tests/handlers/channels``.
"""

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.clock import ManualClock
from delivery.settings import Settings
from delivery.store.sql import SqlStore

# The channels-core engineer's provider stand-ins and SMTP servers (session-scoped), reused.
from tests.handlers.channels.conftest import (  # noqa: F401
    SmtpServer,
    _run_smtp,
    clock,
    fcm_standin,
    plain_smtp,
    provider_url,
    providers,
    rsa_key,
    service_account_info,
    twilio_standin,
)
from tests.handlers.channels.standins import SmtpSink

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def _plain_smtp() -> Iterator[SmtpServer]:
    """
    One plain relay offering PIPELINING, as submission servers do: the worker's tests
    run once, the channel's own (``tests/handlers/channels``) with and without it.
    """
    yield from _run_smtp(SmtpSink(pipelining=True))


def channel_settings(data_dir: Path, **overrides: object) -> Settings:
    """Settings for these tests: loopback webhooks allowed, the key file under ``data_dir``."""
    values: dict[str, object] = {
        "subject_prefix": "test",
        "data_dir": data_dir,
        "webhook_allow_nets": "127.0.0.0/8",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class Api:
    """Two tenants' clients over one in-process app."""

    store: SqlStore
    clock: ManualClock
    alpha: httpx.AsyncClient
    beta: httpx.AsyncClient
    projects: dict[str, str]


@pytest.fixture
async def api(engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[Api]:
    """The API in-process (ASGITransport) on a schema made from the metadata."""
    manual = ManualClock(START)
    store = SqlStore(engine)
    projects: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name in ("alpha", "beta"):
        project = await store.keys.ensure_project(name, START)
        projects[name] = project.id
        keys[name] = await store.keys.create_api_key(project.id, START)
    app = create_app(channel_settings(tmp_path), store, manual)
    transport = httpx.ASGITransport(app=app)

    def client(key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=transport,
            base_url="http://api.test",
            headers={"Authorization": f"Bearer {key}"},
        )

    async with client(keys["alpha"]) as alpha, client(keys["beta"]) as beta:
        yield Api(store, manual, alpha, beta, projects)
