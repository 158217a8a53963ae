"""
The console in a real browser: Debian's Chromium (``/usr/bin/chromium``, installed by
``.ci/run``) driven by Playwright, never a browser Playwright downloads; the app under
uvicorn in the test's own event loop, so it shares the test's engine.
"""

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from playwright.async_api import Browser, async_playwright
from starlette.types import ASGIApp

CHROMIUM = Path(os.environ.get("DELIVERY_CHROMIUM", "/usr/bin/chromium"))
"""The system's Chromium; ``.ci/run`` installs it with apt."""


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """``app`` under uvicorn on a free loopback port, in this event loop; its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Chromium from the system packages (no sandbox: CI runs as root)."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 - one stat before a browser start
        raise RuntimeError(
            f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does it)"
        )
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()
