"""
The ``delivery`` console script: the composition root for every process kind.

Each command group lives in :mod:`delivery.commands` and registers itself here.
"""

import typer

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


def main() -> None:
    """Console-script entry point."""
    app()
