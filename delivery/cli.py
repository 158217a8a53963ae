"""
The ``delivery`` console script: the composition root for every process kind.

Each command group lives in :mod:`delivery.commands` and registers itself here.
"""

import sys
from typing import get_args

import typer
from pydantic import SecretStr, ValidationError

# lean_imports first (isort keeps "from delivery import" before "from delivery.x"): it
# must import structlog and httpx before the commands below do.
from delivery import __version__, lean_imports  # noqa: F401 - imported for its effect
from delivery.commands import api, cadence, daemon, explain, receiver, store, workbench
from delivery.settings import Settings

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


for _module in (cadence, store, api, daemon, receiver, explain, workbench):
    _module.register(app)


def _is_secret(field: str) -> bool:
    info = Settings.model_fields.get(field)
    return info is not None and (
        info.annotation is SecretStr or SecretStr in get_args(info.annotation)
    )


def settings_errors(exc: ValidationError) -> str:
    """
    One line per bad ``DELIVERY_*`` variable: its name, the problem, the value given
    (withheld for secrets: a rejected token or key is still someone's credential).
    """
    lines = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        name = f"DELIVERY_{field.upper()}"
        given = "a secret, not shown" if _is_secret(field) else repr(error.get("input"))
        lines.append(f"{name}: {error['msg']} (got {given})")
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
