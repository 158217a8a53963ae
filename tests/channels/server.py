"""The whole API under uvicorn in a thread, with values put on ``app.state`` first."""

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

from delivery.clock import Clock
from delivery.settings import Settings
from tests.api.server import ServedApi, serve_api


def serve_api_with_state(
    database_url: str,
    clock: Clock,
    settings: Settings,
    state: Mapping[str, Any],
    *,
    startup_timeout_s: float = 20.0,
) -> AbstractContextManager[ServedApi]:
    """:func:`tests.api.server.serve_api` with ``state`` (e.g. the stream's ``StreamConfig``)."""
    return serve_api(
        database_url, clock, settings=settings, state=state, startup_timeout_s=startup_timeout_s
    )
