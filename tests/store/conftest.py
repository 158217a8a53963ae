"""Store fixtures: each store test runs every form the database has (native, portable)."""

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.engine import Capabilities, create_engine
from delivery.store.tables import ProjectRow
from delivery.store.tables import metadata as all_tables

SQLITE_PROJECT_CREATED = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """A SQLite file with every table and one project, ``prj``, for the SQLite-only paths."""
    eng = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    async with eng.begin() as conn:
        await conn.run_sync(all_tables.create_all)
        projects = ProjectRow.__table__  # type: ignore[attr-defined]
        await conn.execute(
            projects.insert().values(id="prj", name="p", created_at=SQLITE_PROJECT_CREATED)
        )
    try:
        yield eng
    finally:
        await eng.dispose()


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
