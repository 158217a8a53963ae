"""Start a real `delivery <command>` process and talk to its HTTP endpoints."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from delivery.embedded import free_port


@dataclass
class Proc:
    """A started `delivery` process: its base URL (ops port or API port) and its log."""

    process: asyncio.subprocess.Process
    base_url: str
    log: Path

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (the banner and others are skipped)."""
        text = self.log.read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def tail(self) -> str:
        """The end of the log, for a failure message."""
        return self.log.read_text()[-3000:]


def env(**extra: str) -> dict[str, str]:
    """The test's environment without its DELIVERY_* settings, plus ``extra``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    # Every part must share the deployment's key (required with PostgreSQL).
    clean.update({"DELIVERY_LOG_JSON": "true", "DELIVERY_SECRET_KEY": "ops-test-key", **extra})
    return clean


@asynccontextmanager
async def started(
    command: str, log: Path, *, port_setting: str = "DELIVERY_OPS_PORT", **settings: str
) -> AsyncIterator[Proc]:
    """
    Run ``delivery <command>`` until the block ends (SIGTERM, then it must exit 0);
    ready once ``/health`` answers on the port ``port_setting`` names.
    """
    port = free_port()
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "delivery",
            command,
            env=env(**{port_setting: str(port)}, **settings),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc = Proc(process, f"http://127.0.0.1:{port}", log)
    try:
        await _wait_healthy(proc)
        yield proc
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0, proc.tail()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _wait_healthy(proc: Proc, timeout_s: float = 60.0) -> None:
    async with httpx.AsyncClient(base_url=proc.base_url, timeout=2.0) as client:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if proc.process.returncode is not None:
                raise AssertionError(f"process exited: {proc.tail()}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"never healthy: {proc.tail()}")
            await asyncio.sleep(0.1)


def exported_names(text: str) -> set[str]:
    """
    Every sample name a Prometheus text exposition can contain, from its TYPE lines
    (a family without samples yet still names itself): counters as ``*_total``,
    histograms as ``*_bucket`` / ``*_sum`` / ``*_count``, the others as they are.
    """
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(" ", 3)
        if kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
        elif kind == "summary":
            names.update({name, f"{name}_sum", f"{name}_count"})
        else:
            names.add(name)
    return names
