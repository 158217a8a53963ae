"""
The webhook rig: the API in-process (ASGITransport) and a :class:`WebhookWorker` on the
same database (both kinds), a manual clock, and real receivers under uvicorn.
"""

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.api import create_app
from delivery.bus.messages import NotificationCreated
from delivery.clock import ManualClock, SystemClock
from delivery.settings import Settings
from delivery.store.sql import SqlStore
from delivery.store.webhooks import ClaimedDelivery, WebhookStore
from handlers.webhooks.worker import WebhookWorker
from tests.fixtures.http import ServeApp
from tests.handlers.webhooks.stub import Reply, ScriptedReceiver
from tests.webhooks.helpers import EVENT, add_notifications, notification_row, webhook_settings


def near_now() -> datetime:
    """
    A rig's start: near real time, so the standardwebhooks library (which reads the
    real clock, with 5 minutes' tolerance) verifies. Taken per test, not at import:
    a suite run longer than 5 minutes would otherwise fail its later tests.
    """
    return SystemClock().now().replace(microsecond=0)


def neutral() -> float:
    """A jitter draw that leaves every retry delay exactly on the schedule."""
    return 0.5


@dataclass
class Rig:
    """Everything an end-to-end webhook test touches."""

    engine: AsyncEngine
    clock: ManualClock
    settings: Settings
    api: httpx.AsyncClient
    projects: dict[str, str]
    serve: ServeApp
    webhooks: WebhookStore
    start: datetime
    workers: list[WebhookWorker] = field(default_factory=list)

    def receiver(self, *replies: Reply) -> tuple[ScriptedReceiver, str]:
        """A real receiver answering ``replies`` in order (the last repeats); its hook URL."""
        receiver = ScriptedReceiver(list(replies) or [Reply()])
        return receiver, self.serve(receiver) + "/hook"

    def worker(self, **kwargs: Any) -> WebhookWorker:
        """A worker on the rig's database and clock, stopped at teardown."""
        options: dict[str, Any] = {"clock": self.clock, "rand": neutral} | kwargs
        settings = options.pop("settings", self.settings)
        worker = WebhookWorker(settings, self.engine, **options)
        self.workers.append(worker)
        return worker

    async def claim(
        self,
        limit: int,
        *,
        now: datetime | None = None,
        per_endpoint: int | None = None,
        in_flight: Mapping[str, int] | None = None,
    ) -> list[ClaimedDelivery]:
        """
        :meth:`WebhookStore.claim_due` as worker ``w1`` with a one-minute lease, at
        ``now`` (the rig's clock by default).
        """
        return await self.webhooks.claim_due(
            now=self.clock.now() if now is None else now,
            limit=limit,
            lease=timedelta(minutes=1),
            worker_id="w1",
            per_endpoint=per_endpoint,
            in_flight=in_flight,
        )

    async def backlogs(self, alpha: int, beta: int) -> None:
        """
        One endpoint each for alpha and beta, both answering 200; ``alpha`` deliveries
        enqueued for alpha, then a second later ``beta`` for beta.
        """
        _, url = self.receiver(Reply(200))
        await self.register(url)
        await self.register(url, project="beta")
        worker = self.worker()
        assert await worker.enqueue(await self.notify(*range(1, alpha + 1))) == alpha
        self.clock.advance(timedelta(seconds=1))
        notes = await self.notify(*range(1, beta + 1), project="beta", at=self.clock.now())
        assert await worker.enqueue(notes) == beta

    async def key_for(self, project: str) -> str:
        """A new API key of ``project`` (``alpha``, ``beta``)."""
        return await SqlStore(self.engine).keys.create_api_key(
            self.projects[project], self.clock.now()
        )

    async def register(
        self,
        url: str,
        *,
        event_type: str = EVENT,
        auth_header: str | None = None,
        project: str = "alpha",
    ) -> str:
        """Register ``url`` through the API for ``project``; returns the signing secret."""
        body: dict[str, str] = {"webhook_url": url}
        if auth_header:
            body["auth_header"] = auth_header
        headers: dict[str, str] = {}
        if project != "alpha":  # the client's own key is alpha's
            headers["Authorization"] = f"Bearer {await self.key_for(project)}"
        response = await self.api.put(f"/api/v1/webhooks/{event_type}", json=body, headers=headers)
        assert response.status_code == 200, response.text
        return str(response.json().get("signing_secret", ""))

    async def notify(
        self,
        *ns: int,
        event_type: str = EVENT,
        project: str = "alpha",
        at: datetime | None = None,
    ) -> list[NotificationCreated]:
        """
        Insert notifications ``ns`` for ``project``, made at ``at`` (the rig's start by
        default); returns their created messages.
        """
        project = self.projects[project]
        made = self.start if at is None else at
        rows = [notification_row(project, n, made, event_type=event_type) for n in ns]
        await add_notifications(self.engine, rows)
        return [
            NotificationCreated(
                notification_id=r["id"],
                project_id=project,
                agent_id=r["agent_id"],
                user_id=r["user_id"],
                event_type=event_type,
            )
            for r in rows
        ]

    async def attempts(self, event_type: str = EVENT) -> list[dict[str, Any]]:
        """Every attempt through the API, newest first, following cursors."""
        found: list[dict[str, Any]] = []
        params: dict[str, str] = {"page_size": "3"}
        while True:
            response = await self.api.get(f"/api/v1/webhooks/{event_type}/attempts", params=params)
            assert response.status_code == 200, response.text
            page = response.json()
            found += page["attempts"]
            if not page.get("next_cursor"):
                return found
            params["cursor"] = page["next_cursor"]


@pytest.fixture
async def rig(engine: AsyncEngine, http_server: ServeApp) -> AsyncIterator[Rig]:
    """The rig over both databases; workers are stopped before the engine goes."""
    start = near_now()
    clock = ManualClock(start)
    settings = webhook_settings(webhook_timeout_s=0.5)
    store = SqlStore(engine)
    projects: dict[str, str] = {}
    keys: dict[str, str] = {}
    for name in ("alpha", "beta"):
        project = await store.keys.ensure_project(name, start)
        projects[name] = project.id
        keys[name] = await store.keys.create_api_key(project.id, start)
    app = create_app(settings, store, clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://api.test",
        headers={"Authorization": f"Bearer {keys['alpha']}"},
    ) as api:
        rig = Rig(engine, clock, settings, api, projects, http_server, WebhookStore(engine), start)
        try:
            yield rig
        finally:
            for worker in rig.workers:
                await worker.stop()
