"""
Safe starts with real processes: one `delivery run` per data folder, the port checked
before any side effect, and each start-up failure told in one line with exit status 1
(the traceback only with --debug).
"""

import asyncio
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from delivery.settings import Settings
from delivery.startup import StartupError, check_secret_key
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from tests.daemon.test_data_modes import _delivery_run

NOW = datetime(2026, 5, 1, tzinfo=UTC)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(DELIVERY_LOG_LEVEL="WARNING", **extra)
    return env


def _delivery(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_failure(out: subprocess.CompletedProcess[str], expected: str) -> None:
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("delivery: "), out.stderr
    assert expected in last, out.stderr


async def test_a_second_run_on_one_data_folder_is_refused(tmp_path: Path) -> None:
    """The second instance names the first one's pid and leaves it running untouched."""
    data = tmp_path / "data"
    async with _delivery_run(data, tmp_path / "first.log") as url:
        holder = (data / "delivery.lock").read_text().strip()
        second = await asyncio.to_thread(
            _delivery, "run", env=_env(DELIVERY_DATA_DIR=str(data), DELIVERY_PORT="0")
        )
        _one_line_failure(second, f"another delivery process (pid {holder}) is running")
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{url}/health")).status_code == 200


def test_a_taken_port_fails_before_anything_starts(tmp_path: Path) -> None:
    """No nats-server store, no database: the port is checked first, in one line."""
    data = tmp_path / "data"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _delivery("run", env=_env(DELIVERY_DATA_DIR=str(data), DELIVERY_PORT=str(port)))
    _one_line_failure(out, f"port {port} on 127.0.0.1 is taken")
    assert not (data / "nats").exists()
    assert not (data / "delivery.db").exists()


def test_an_unreachable_database_is_one_line_and_debug_shows_why(tmp_path: Path) -> None:
    """`migrate` against a closed port: one line; with --debug, the traceback."""
    env = _env(
        DELIVERY_DATABASE_URL="postgresql+asyncpg://postgres@127.0.0.1:9/nowhere",
        DELIVERY_DATA_DIR=str(tmp_path / "data"),
        DELIVERY_SECRET_KEY="k",
    )
    _one_line_failure(_delivery("migrate", env=env), "cannot reach the database")
    debug = _delivery("migrate", "--debug", env=env)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr


def test_an_unusable_database_url_is_one_line(tmp_path: Path) -> None:
    env = _env(DELIVERY_DATABASE_URL="mysql://x@localhost/db", DELIVERY_SECRET_KEY="k")
    _one_line_failure(_delivery("migrate", env=env), "unsupported database URL scheme")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_postgres_parts_need_the_secret_key(database_url: str, tmp_path: Path) -> None:
    """Without DELIVERY_SECRET_KEY each part would make its own key: refused at start."""
    env = _env(
        DELIVERY_DATABASE_URL=database_url,
        DELIVERY_DATA_DIR=str(tmp_path / "data"),
        DELIVERY_NATS_URL=os.environ.get("DELIVERY_NATS_URL", "nats://127.0.0.1:4222"),
    )
    for part in ("scheduler", "web"):
        _one_line_failure(_delivery(part, env=env), "DELIVERY_SECRET_KEY is required")


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_unreachable_nats_is_one_line(database_url: str, tmp_path: Path) -> None:
    env = _env(
        DELIVERY_DATABASE_URL=database_url,
        DELIVERY_SECRET_KEY="one-key",
        DELIVERY_NATS_URL="nats://127.0.0.1:9",
    )
    _one_line_failure(_delivery("dispatcher", env=env, timeout=90), "cannot reach NATS")


async def test_parts_with_different_keys_are_caught_at_start(
    database_url: str, tmp_path: Path
) -> None:
    """The first part seals a check value; a part with another key cannot open it."""
    await migrate(database_url)
    engine = create_engine(database_url)
    try:
        one = Settings(data_dir=tmp_path, secret_key=SecretStr("key-one"))
        await check_secret_key(one, engine, NOW)
        await check_secret_key(one, engine, NOW)  # the same key again: fine
        with pytest.raises(StartupError, match="differs from the key"):
            await check_secret_key(
                Settings(data_dir=tmp_path, secret_key=SecretStr("key-two")), engine, NOW
            )
    finally:
        await engine.dispose()
