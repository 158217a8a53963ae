"""
``delivery cadence preview``: the next fires of a schedule body, in UTC and local time.

The I/O shell around the pure engine: it parses the JSON argument, reads the
system clock when ``--after`` is omitted, and prints.
"""

import json
from datetime import UTC, datetime
from typing import Any

import typer

from delivery.cadence import compile_schedule, format_local, format_utc, parse_instant, upcoming
from delivery.errors import DeliveryError, InvalidLimitError, InvalidRequestError

cadence_app = typer.Typer(
    name="cadence", help="Cadence engine tools.", no_args_is_help=True, add_completion=False
)

_BODY_KEYS = ("cadence", "active_window", "starts_at", "ends_at")


def _preview(body_text: str, after_text: str | None, limit: int, now: datetime) -> list[str]:
    """
    Lines to print for a preview, one ``<utc>  <local>`` pair per fire.

    The schedule is compiled as if created at ``--after`` (the anchor of
    ``interval_hours`` without ``starts_at``, and the "ends_at already past"
    check), so a preview of the past or the future behaves like a create then.

    Raises:
        DeliveryError: bad JSON, bad fields, or any cadence validation error.
    """
    try:
        body: Any = json.loads(body_text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("", f"the schedule is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("", "the schedule must be a JSON object with a cadence")
    for key in body:
        if key not in _BODY_KEYS:
            raise InvalidRequestError(key, f"{key} is not a schedule field for a preview")
    if "cadence" not in body:
        raise InvalidRequestError("cadence", "cadence is required")
    if not 1 <= limit <= 1000:
        raise InvalidLimitError("limit", f"-n must be between 1 and 1000; got {limit}")
    after = parse_instant(after_text, "--after") if after_text is not None else now
    starts_at = body.get("starts_at")
    ends_at = body.get("ends_at")
    schedule = compile_schedule(
        body["cadence"],
        body.get("active_window"),
        starts_at=parse_instant(starts_at, "starts_at") if starts_at is not None else None,
        ends_at=parse_instant(ends_at, "ends_at") if ends_at is not None else None,
        created_at=after,
        now=after,
    )
    fires = upcoming(schedule, after, limit)
    if not fires:
        return ["no upcoming fires"]
    return [f"{format_utc(fire)}  {format_local(fire, schedule.zone)}" for fire in fires]


@cadence_app.command("preview")
def preview(
    schedule: str = typer.Argument(
        ...,
        help='Schedule body as JSON: {"cadence": ..., "active_window": ..., '
        '"starts_at": ..., "ends_at": ...}',
    ),
    after: str | None = typer.Option(
        None, "--after", help="RFC 3339 instant to preview from (default: now)."
    ),
    limit: int = typer.Option(10, "-n", "--limit", help="How many fires to print (1-1000)."),
) -> None:
    """Print the next fires of a schedule, each in UTC and in the schedule's zone."""
    try:
        lines = _preview(schedule, after, limit, datetime.now(UTC))
    except DeliveryError as exc:
        typer.echo(f"error {exc.code}: {exc.message}", err=True)
        raise typer.Exit(code=1) from None
    for line in lines:
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add the ``cadence`` command group to the root app."""
    app.add_typer(cadence_app, name="cadence")
