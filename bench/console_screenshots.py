"""
A screenshot of every console page, for a reviewer to look at: the app in-process on a
fresh SQLite database, seeded through the API (schedules, advance-time for fires and
skips, a webhook whose receiver fails then succeeds, attempts made by the real worker),
then headless Chromium (the system's, ``/usr/bin/chromium``) at 1280 px and 360 px.

    .venv/bin/python bench/console_screenshots.py /tmp/console-shots

Writes ``<page>-wide.png`` and ``<page>-narrow.png`` for sign-in, users, user, explain,
schedule, webhooks, webhook and health into the folder given, and prints their paths.
"""

import argparse
import asyncio
import socket
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from playwright.async_api import async_playwright
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from delivery.api import create_app
from delivery.clock import ManualClock
from delivery.settings import Settings
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore
from delivery.store.webhooks import NewNotification
from handlers.webhooks.worker import WebhookWorker

START = datetime(2026, 10, 22, 6, 0, tzinfo=UTC)
AGENT, USER = "agent-coach", "user-ada"
CHROMIUM = "/usr/bin/chromium"


def _receiver() -> Starlette:
    """Answers 500 to every other request, 200 otherwise."""
    seen = {"n": 0}

    async def hook(request: Request) -> Response:
        seen["n"] += 1
        await request.body()
        if seen["n"] % 2:
            return JSONResponse({"error": "upstream busy"}, status_code=500)
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/hook", hook, methods=["POST"])])


async def _serve(app: Any) -> tuple[str, uvicorn.Server, asyncio.Task[None]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, ws="none", lifespan="off")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.01)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, task


async def _seed(api: httpx.AsyncClient) -> str:
    user = f"/api/v1/agents/{AGENT}/users/{USER}"
    first = ""
    for body in (
        {
            "check_type": "morning_checkin",
            "intent": "ask how the user slept",
            "cadence": {
                "simple": {
                    "frequency": "weekly",
                    "days_of_week": ["mon", "tue", "wed", "thu", "fri"],
                    "times": ["06:30", "08:30"],
                },
                "timezone": "Europe/London",
            },
            "active_window": {"hours": {"start": "07:00", "end": "21:00"}},
        },
        {
            "check_type": "medication",
            "intent": "remind the evening dose",
            "cadence": {
                "simple": {"frequency": "daily", "times": ["20:00"]},
                "timezone": "America/New_York",
            },
        },
    ):
        created = await api.post(f"{user}/schedules", json=body)
        created.raise_for_status()
        first = first or str(created.json()["schedule_id"])
    advanced = await api.post(
        "/api/v1/workbench/advance-time",
        json={"agent_id": AGENT, "user_id": USER, "simulated_hours": 60},
    )
    advanced.raise_for_status()
    return first


async def main(folder: Path) -> None:
    """Seed, serve, sign in and photograph every page at both widths."""
    tmp = tempfile.TemporaryDirectory(prefix="dlv-shots-")
    url = f"sqlite+aiosqlite:///{Path(tmp.name) / 'delivery.db'}"
    await migrate(url)
    engine = create_engine(url)
    settings = Settings(
        subject_prefix="shots",
        data_dir=Path(tmp.name),
        secret_key=SecretStr("screenshots"),
        webhook_allow_nets="127.0.0.0/8",
    )
    clock = ManualClock(START)
    store = SqlStore(engine)
    project = await store.keys.ensure_project("demo", START)
    key = await store.keys.create_api_key(project.id, START)
    app = create_app(settings, store, clock)
    hook_url, hook_server, hook_task = await _serve(_receiver())
    base, server, task = await _serve(app)
    worker = WebhookWorker(settings, engine, clock=clock)
    try:
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {key}"}
        ) as api:
            schedule_id = await _seed(api)
            await api.put(
                "/api/v1/webhooks/on_recurring_event_due",
                json={"webhook_url": hook_url + "/hook", "auth_header": "Bearer receiver-token"},
            )
            notes = await api.get(f"/api/v1/agents/{AGENT}/notifications", params={"limit": "20"})
            ids = [n["message_id"] for n in notes.json()["notifications"]]
        await worker.enqueue(
            [NewNotification(i, project.id, "on_recurring_event_due") for i in ids[:4]]
        )
        await worker.sweep()
        clock.advance(timedelta(seconds=10))
        await worker.sweep()
        user = f"/console/users/{AGENT}/{USER}"
        pages = {
            "users": "/console/users?agent=agent-&user=user-",
            "user": user,
            "explain": f"{user}?at=2026-10-22T05:30:00Z&window=1h",
            "schedule": f"{user}/schedules/{schedule_id}",
            "webhooks": "/console/webhooks",
            "webhook": "/console/webhooks/on_recurring_event_due",
            "health": "/console/health",
        }
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
            )
            for width, tag in ((1280, "wide"), (360, "narrow")):
                page = await browser.new_page(viewport={"width": width, "height": 900})
                await page.goto(base + "/console/sign-in")
                shot = folder / f"sign-in-{tag}.png"
                await page.screenshot(path=str(shot), full_page=True)
                print(shot)
                await page.get_by_label("API key").fill(key)
                await page.get_by_role("button", name="Sign in").click()
                await page.wait_for_url("**/console/users")
                for name, path in pages.items():
                    await page.goto(base + path)
                    shot = folder / f"{name}-{tag}.png"
                    await page.screenshot(path=str(shot), full_page=True)
                    print(shot)
                await page.close()
            await browser.close()
    finally:
        await worker.stop()
        for s in (server, hook_server):
            s.should_exit = True
        await asyncio.gather(task, hook_task)
        await engine.dispose()
        tmp.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where the PNGs are written")
    out = parser.parse_args().folder
    out.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(out))
