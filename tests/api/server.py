"""
The whole API under uvicorn in a background thread, on a free port, for SDK tests.

Unlike ``tests/fixtures/http.py`` (which serves a ready ASGI app), the engine has
to be created inside the server's own event loop (asyncpg connections belong to
one loop), so this helper builds everything in the thread: migrate, engine,
store, two projects with a key each, the app.
"""

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from delivery.api import Wakeable, create_app
from delivery.api.serving import server_config
from delivery.clock import Clock
from delivery.settings import Settings
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore


@dataclass
class ServedApi:
    """What a test needs to reach the served API."""

    base_url: str = ""
    projects: dict[str, str] = field(default_factory=dict)
    """Project name (``alpha``, ``beta``) -> project id."""
    keys: dict[str, str] = field(default_factory=dict)
    """Project name -> API key."""


@contextmanager
def serve_api(
    database_url: str,
    clock: Clock,
    *,
    settings: Settings | None = None,
    waker: Wakeable | None = None,
    state: Mapping[str, Any] | None = None,
    startup_timeout_s: float = 20.0,
) -> Iterator[ServedApi]:
    """
    Migrate ``database_url`` and serve the API on it until the block exits.

    ``state`` is put on ``app.state`` before serving (a constructor seam for
    collaborators such as the stream's config, not a monkeypatch).

    Raises:
        RuntimeError: the server did not come up (the thread's error is chained).
    """
    served = ServedApi()
    settings = settings or Settings(subject_prefix="test")
    holder: dict[str, uvicorn.Server] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        await migrate(database_url)
        engine = create_engine(database_url)
        try:
            store = SqlStore(engine)
            for name in ("alpha", "beta"):
                project = await store.keys.ensure_project(name, clock.now())
                served.projects[name] = project.id
                served.keys[name] = await store.keys.create_api_key(project.id, clock.now())
            app = create_app(settings, store, clock, waker)
            for name, value in (state or {}).items():
                setattr(app.state, name, value)
            # The production configuration (connection bounds from ``settings``).
            config = server_config(
                app,
                settings,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
            server = uvicorn.Server(config)
            holder["server"] = server
            await server.serve()
        finally:
            await engine.dispose()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the waiting test thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="api-test-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while "server" not in holder or not holder["server"].started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API test server did not start: {failure!r}") from (
                    failure[0] if failure else None
                )
            time.sleep(0.01)
        port = holder["server"].servers[0].sockets[0].getsockname()[1]
        served.base_url = f"http://127.0.0.1:{port}"
        yield served
    finally:
        if "server" in holder:
            holder["server"].should_exit = True
        thread.join(timeout=startup_timeout_s)
