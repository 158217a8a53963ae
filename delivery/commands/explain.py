"""
``delivery explain``: a user's (or a schedule's) story around an instant, and whether
they got a message then and why not, straight from the database.

It reads the database the settings name (``DELIVERY_DATABASE_URL``, else SQLite in
``DELIVERY_DATA_DIR``) through the timeline store, and asks the same pure
:func:`delivery.explain.explain` the API asks. Colour on a terminal, plain text
otherwise, JSON with ``--json``. Read-only: it never migrates or writes.
"""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import typer

from delivery.cadence import EARLIEST, format_utc, parse_instant
from delivery.errors import DeliveryError, InvalidRequestError, NotFoundError
from delivery.explain import explain, parse_window
from delivery.logs import configure_logging
from delivery.settings import Settings
from delivery.store.advance import Pair, SqlAdvanceStore
from delivery.store.engine import create_engine
from delivery.store.timeline import PageQuery, Scope, SqlTimelineStore
from delivery.timeline import Order, local_time, to_wire

STORY_SPAN = timedelta(days=1)
"""How far before the instant the printed story starts."""

_COLOURS = {
    "fire.skipped": typer.colors.YELLOW,
    "notification.failed_generation": typer.colors.RED,
    "webhook.dead_lettered": typer.colors.RED,
    "webhook_endpoint.disabled": typer.colors.RED,
    "notification.consumed": typer.colors.GREEN,
    "fire.fired": typer.colors.CYAN,
}


def pick_project(projects: list[tuple[str, str]], wanted: str | None) -> str:
    """The id of the project named (or with the id) ``wanted``; the only one when omitted."""
    if wanted is not None:
        for pid, name in projects:
            if wanted in (pid, name):
                return pid
        raise NotFoundError("--project", f"--project {wanted!r}: no such project")
    if len(projects) == 1:
        return projects[0][0]
    names = ", ".join(name for _, name in projects) or "none"
    raise InvalidRequestError("--project", f"--project is required (projects: {names})")


async def story(
    settings: Settings,
    *,
    project: str | None,
    agent: str,
    user: str,
    schedule: str | None,
    at: datetime | None,
    window: timedelta,
    limit: int,
    now: datetime,
) -> dict[str, Any]:
    """
    The events of the day before ``at`` (to ``at + window``) and the explanation.

    ``now`` is real time; an advanced pair is judged on its own clock (its rows are
    dated there), which is also ``at`` when none is given.
    """
    engine = create_engine(settings.resolved_database_url())
    try:
        store = SqlTimelineStore(engine)
        scope = Scope(pick_project(await store.projects(), project), agent, user, schedule)
        if schedule is not None and not await store.schedule_known(scope):
            raise NotFoundError("--schedule", f"--schedule {schedule!r}: no such schedule")
        offset = await SqlAdvanceStore(engine).clock_offset(Pair(scope.project_id, agent, user))
        now += timedelta(seconds=offset or 0.0)
        at = at or now
        lateness = timedelta(seconds=settings.max_lateness_s)
        query = PageQuery(
            since=max(at - STORY_SPAN, EARLIEST),
            until=at + window,
            after=None,
            order=Order.DESC,
            limit=limit,
            now=now,
            max_lateness=lateness,
        )
        found = await store.page(scope, query)
        events, zone = found.events[:limit][::-1], found.zone
        facts = await store.explain_facts(
            scope, at=at, window=window, now=now, max_lateness=lateness
        )
    finally:
        await engine.dispose()
    answer = explain(facts)
    name = answer.timezone or zone.name
    return {
        "project_id": scope.project_id,
        "agent_id": agent,
        "user_id": user,
        **({"schedule_id": schedule} if schedule else {}),
        "timezone": {"name": zone.name, "source": zone.source},
        "events": [to_wire(e, zone.name, zone.source) for e in events],
        "explanation": {
            **answer.to_dict(),
            "at": format_utc(at),
            "local_at": local_time(at, name),
            "window_s": int(window.total_seconds()),
        },
    }


def render(body: dict[str, Any]) -> list[str]:
    """The story as lines, styled (``typer.echo`` drops the styles off a terminal)."""
    zone = body["timezone"]
    lines = [
        typer.style(f"{body['agent_id']} / {body['user_id']}", bold=True)
        + f"  (local times without a schedule: {zone['name']}, from {zone['source']})"
    ]
    for e in body["events"]:
        kind = typer.style(f"{e['kind']:<31}", fg=_COLOURS.get(e["kind"]))
        lines.append(f"{e['at']}  {e['local_at']:<25}  {kind} {e['summary']}")
    if not body["events"]:
        lines.append("(nothing recorded in the day before that instant)")
    answer = body["explanation"]
    colour = typer.colors.GREEN if answer["got_message"] else typer.colors.RED
    lines.append("")
    lines.append(
        typer.style(f"{answer['code']}", fg=colour, bold=True)
        + f" at {answer['at']} ({answer['local_at']}, +/- {answer['window_s']} s)"
    )
    lines.append(answer["sentence"])
    return lines


def explain_command(
    agent: str = typer.Option(..., "--agent", help="Agent id."),
    user: str = typer.Option(..., "--user", help="User id."),
    schedule: str | None = typer.Option(None, "--schedule", help="Only this schedule."),
    at: str | None = typer.Option(None, "--at", help="RFC 3339 instant (default: now)."),
    window: str | None = typer.Option(
        None, "--window", help="How far around --at: 90s, 30m, 2h, 1d (default 1h)."
    ),
    project: str | None = typer.Option(
        None, "--project", help="Project name or id (default: the only project)."
    ),
    limit: int = typer.Option(30, "-n", "--limit", help="Events to print (1-500)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
) -> None:
    """Say whether USER got a message around --at, and why not, with the story before it."""
    settings = Settings()
    configure_logging("WARNING", json=settings.log_json)
    now = datetime.now(UTC)
    try:
        if not 1 <= limit <= 500:
            raise InvalidRequestError("--limit", f"--limit must be between 1 and 500; got {limit}")
        instant = None if at is None else parse_instant(at, "--at")
        body = asyncio.run(
            story(
                settings,
                project=project,
                agent=agent,
                user=user,
                schedule=schedule,
                at=instant,
                window=parse_window(window),
                limit=limit,
                now=now,
            )
        )
    except DeliveryError as exc:
        typer.echo(f"error {exc.code}: {exc.message}", err=True)
        raise typer.Exit(code=1) from None
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    for line in render(body):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add ``explain`` to the root app."""
    app.command("explain", help="Why a user did (not) get a message around an instant.")(
        explain_command
    )


__all__ = ["explain_command", "register", "render", "story"]
