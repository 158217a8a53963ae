"""Store fixtures: each store test runs every form the database has (native, portable)."""

from dataclasses import replace

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store.engine import Capabilities


@pytest.fixture(params=["native", "portable"])
def capabilities(request: pytest.FixtureRequest, engine: AsyncEngine) -> Capabilities:
    """
    The engine's own capabilities, then the same without the SQLite driver-thread
    path, so the portable Core form is checked on SQLite too (on PostgreSQL the two
    are one form, and the second run is skipped).
    """
    native = Capabilities.of(engine)
    if request.param == "native":
        return native
    if not native.driver_thread:
        pytest.skip("on this database the native form is the portable one")
    return replace(native, driver_thread=False)
