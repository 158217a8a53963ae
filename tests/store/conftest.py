"""Store fixtures: each store test runs every form the database has (native, portable)."""

from dataclasses import replace

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.engine import Capabilities


@pytest.fixture(params=["native", "portable"])
def capabilities(request: pytest.FixtureRequest, engine: AsyncEngine) -> Capabilities:
    """
    The engine's own capabilities, then the same without the SQLite driver-thread
    path, so the portable Core form is checked on SQLite too.
    """
    native = Capabilities.of(engine)
    return native if request.param == "native" else replace(native, driver_thread=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On PostgreSQL the native form is the portable one: its second run is deselected."""
    twice = [item for item in items if _params(item) == {"postgres", "portable"}]
    if twice:
        config.hook.pytest_deselected(items=twice)
        items[:] = [item for item in items if item not in twice]


def _params(item: pytest.Item) -> set[str]:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return set()
    return {str(callspec.params.get(name)) for name in ("database_url", "capabilities")}
