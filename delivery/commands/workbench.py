"""
``delivery workbench``: the advance-time workbench from a terminal.

``reset-clock`` puts an (agent, user) pair's simulated clock back on real time,
as ``POST /api/v1/workbench/reset-clock`` does, against the database of the
settings (no server needed).
"""

import asyncio
import json
from typing import Any

import typer

from delivery.clock import SystemClock
from delivery.commands.explain import pick_project
from delivery.errors import DeliveryError
from delivery.logs import configure_logging
from delivery.settings import Settings
from delivery.store.advance import Pair
from delivery.store.engine import create_engine
from delivery.store.timeline import SqlTimelineStore
from delivery.workbench import reset_clock

workbench_app = typer.Typer(
    name="workbench", help="Advance-time workbench: reset a pair's simulated clock."
)


async def _reset(settings: Settings, project: str | None, agent: str, user: str) -> dict[str, Any]:
    engine = create_engine(settings.resolved_database_url())
    try:
        project_id = pick_project(await SqlTimelineStore(engine).projects(), project)
        return await reset_clock(engine, SystemClock(), Pair(project_id, agent, user))
    finally:
        await engine.dispose()


@workbench_app.command("reset-clock")
def reset_clock_command(
    agent: str = typer.Option(..., "--agent", help="Agent id."),
    user: str = typer.Option(..., "--user", help="User id."),
    project: str | None = typer.Option(
        None, "--project", help="Project name or id (required with several projects)."
    ),
) -> None:
    """Put AGENT/USER's clock back on real time; prints the offset it had."""
    settings = Settings()
    configure_logging("WARNING", json=settings.log_json)
    try:
        body = asyncio.run(_reset(settings, project, agent, user))
    except DeliveryError as exc:
        typer.echo(f"error {exc.code}: {exc.message}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(json.dumps(body))


def register(app: typer.Typer) -> None:
    """Add ``workbench`` to the root app."""
    app.add_typer(workbench_app)


__all__ = ["register", "reset_clock_command"]
