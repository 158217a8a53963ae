"""
Custody of the embedded data folder: a real ``delivery run`` process keeps its SQLite
database (with ``-wal`` and ``-shm``), ``secret.key`` and the embedded nats-server's
store readable by its own user only, and closes what an older version left open.
"""

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

BOOTSTRAP_KEY = "dk_modes_test_key_0123456789"
_API = re.compile(rb"API\s+(http://\S+)")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@asynccontextmanager
async def _delivery_run(data_dir: Path, log: Path) -> AsyncIterator[str]:
    """A ``delivery run`` process on ``data_dir``; yields its API URL, SIGTERMs it after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(
        DELIVERY_DATA_DIR=str(data_dir),
        DELIVERY_PORT="0",
        DELIVERY_BOOTSTRAP_API_KEY=BOOTSTRAP_KEY,
        DELIVERY_LOG_JSON="true",
    )
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "delivery", "run", env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:

        async def api_url() -> str:
            # Another process writes the log: there is no event to wait on.
            while True:
                text = await asyncio.to_thread(log.read_bytes)
                found = _API.search(text)
                if found:
                    return found.group(1).decode()
                assert proc.returncode is None, text.decode()
                await asyncio.sleep(0.05)

        yield await asyncio.wait_for(api_url(), 60)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code == 0, (await asyncio.to_thread(log.read_bytes)).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _seal_something(api: str) -> None:
    """A POST with an Idempotency-Key: its recorded answer is sealed, so the key file exists."""
    async with httpx.AsyncClient(
        base_url=api, headers={"Authorization": f"Bearer {BOOTSTRAP_KEY}"}
    ) as client:
        made = await client.post(
            "/api/v1/agents/agent-1/users/user-1/contacts",
            json={"kind": "sms", "destination": "+14155550100"},
            headers={"Idempotency-Key": "modes-1"},
        )
        assert made.status_code == 201, made.text


@pytest.mark.slow
async def test_delivery_run_creates_its_data_folder_private(tmp_path: Path) -> None:
    """A fresh `delivery run` makes the data folder 0700 and nothing in it group/other-readable."""
    data_dir = tmp_path / "data"
    async with _delivery_run(data_dir, tmp_path / "run.log") as api:
        await _seal_something(api)
        names = {p.name for p in data_dir.iterdir()}
        # While the daemon runs, SQLite holds the WAL and its shared-memory index open.
        assert {"delivery.db", "delivery.db-wal", "delivery.db-shm", "secret.key", "nats"} <= names
        assert any(p.is_file() for p in (data_dir / "nats").rglob("*")), "no JetStream files"
        assert _mode(data_dir) == 0o700
        assert _mode(data_dir / "nats") == 0o700
        for name in ("delivery.db", "delivery.db-wal", "delivery.db-shm", "secret.key"):
            assert _mode(data_dir / name) == 0o600, name
        open_to_others = {
            str(p.relative_to(data_dir)): oct(_mode(p))
            for p in data_dir.rglob("*")
            if _mode(p) & 0o077
        }
        assert open_to_others == {}


@pytest.mark.slow
async def test_delivery_run_closes_what_an_older_version_left_open(tmp_path: Path) -> None:
    """
    Files an older version made 0644 (database, key) and its 0755 NATS store are
    closed at start; the data folder's own mode is left as found, with a warning.
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o755)
    (data_dir / "nats").mkdir()
    (data_dir / "nats").chmod(0o755)
    for name, content in (("delivery.db", b""), ("secret.key", os.urandom(32))):
        (data_dir / name).write_bytes(content)
        (data_dir / name).chmod(0o644)
    log = tmp_path / "run.log"
    async with _delivery_run(data_dir, log) as api:
        await _seal_something(api)
        assert _mode(data_dir / "delivery.db") == 0o600
        assert _mode(data_dir / "delivery.db-wal") == 0o600
        assert _mode(data_dir / "secret.key") == 0o600
        assert _mode(data_dir / "nats") == 0o700
        assert _mode(data_dir) == 0o755
    assert b'"data_dir_open"' in log.read_bytes()
