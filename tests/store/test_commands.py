"""``delivery migrate`` and ``delivery keys create`` as an operator runs them."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from delivery.clock import SystemClock
from delivery.store.engine import create_engine
from delivery.store.sql import SqlStore


async def _project_for(url: str, key: str) -> str | None:
    engine = create_engine(url)
    try:
        return await SqlStore(engine).keys.project_for_key(key, SystemClock().now())
    finally:
        await engine.dispose()


def test_migrate_then_create_key(tmp_path: Path) -> None:
    """The data folder is created, migrations apply, and the printed key authenticates."""
    data = tmp_path / "data"
    env = {**os.environ, "DELIVERY_DATA_DIR": str(data), "DELIVERY_DATABASE_URL": ""}
    cli = [sys.executable, "-m", "delivery"]
    migrated = subprocess.run([*cli, "migrate"], env=env, capture_output=True, text=True)
    assert migrated.returncode == 0, migrated.stderr
    assert (data / "delivery.db").exists()
    created = subprocess.run(
        [*cli, "keys", "create", "--project", "demo"], env=env, capture_output=True, text=True
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("dlv_")
    assert "project: demo (proj_" in created.stderr
    url = f"sqlite+aiosqlite:///{(data / 'delivery.db').resolve()}"
    project = asyncio.run(_project_for(url, key))
    assert project is not None
    assert project.startswith("proj_")
