"""
The whole API under uvicorn in a thread, like ``tests/api/server.py``, plus values put on
``app.state`` before serving (the stream's :class:`StreamConfig`): a constructor seam,
not a monkeypatch.
"""

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import uvicorn

from delivery.api import create_app
from delivery.clock import Clock
from delivery.settings import Settings
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore
from tests.api.server import ServedApi


@contextmanager
def serve_api_with_state(
    database_url: str,
    clock: Clock,
    settings: Settings,
    state: Mapping[str, Any],
    *,
    startup_timeout_s: float = 20.0,
) -> Iterator[ServedApi]:
    """
    Migrate ``database_url`` and serve the API with ``state`` on ``app.state``.

    Raises:
        RuntimeError: the server did not come up (the thread's error is chained).
    """
    served = ServedApi()
    holder: dict[str, uvicorn.Server] = {}
    failure: list[BaseException] = []

    async def main() -> None:
        await migrate(database_url)
        engine = create_engine(database_url)
        try:
            store = SqlStore(engine)
            for name in ("alpha", "beta"):
                project = await store.ensure_project(name, clock.now())
                served.projects[name] = project.id
                served.keys[name] = await store.create_api_key(project.id, clock.now())
            app = create_app(settings, store, clock)
            for key, value in state.items():
                setattr(app.state, key, value)
            server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    host="127.0.0.1",
                    port=0,
                    log_level="warning",
                    access_log=False,
                    ws="none",
                    lifespan="off",
                    timeout_graceful_shutdown=1,
                )
            )
            holder["server"] = server
            await server.serve()
        finally:
            await engine.dispose()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the waiting test thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="api-stream-server", daemon=True)
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
