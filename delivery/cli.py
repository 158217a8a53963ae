"""
The ``delivery`` console script: the composition root for every process kind.

Each command group lives in :mod:`delivery.commands` and registers itself here.
"""

import sys

import typer
from pydantic import ValidationError

from delivery import __version__
from delivery.commands import api, cadence, daemon, receiver, store

app = typer.Typer(
    name="delivery",
    help="Proactive delivery service: schedules, wakeups and trigger events -> messages.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"delivery {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Proactive delivery service."""


for _module in (cadence, store, api, daemon, receiver):
    _module.register(app)


def settings_errors(exc: ValidationError) -> str:
    """One line per bad ``DELIVERY_*`` variable: its name, the problem, the value given."""
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        name = f"DELIVERY_{field.upper()}"
        lines.append(f"{name}: {error['msg']} (got {error.get('input')!r})")
    return "\n".join(lines)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except ValidationError as exc:
        # Settings are read from the environment: a bad variable is an operator
        # error to name, not a traceback. Exit code 2, as for bad arguments.
        if exc.title != "Settings":
            raise
        print(f"invalid configuration:\n{settings_errors(exc)}", file=sys.stderr)
        sys.exit(2)
