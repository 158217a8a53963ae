"""`delivery receiver`: serve the tenant-side webhook receiver standalone (issue 5)."""

import os
from typing import Annotated

import typer

SECRETS_ENV = "DELIVERY_RECEIVER_SECRETS"


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("receiver")(receiver)


def receiver(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8090,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            help=f"A whsec_ signing secret; repeat during a rotation. Default: {SECRETS_ENV}"
            " (comma-separated).",
        ),
    ] = None,
    path: Annotated[str, typer.Option(help="Route that accepts deliveries.")] = "/webhooks/sonzai",
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Verify signed webhook deliveries (either scheme) and log each verified event once."""
    # Imported here so other commands do not pay for FastAPI and uvicorn at start-up.
    import uvicorn

    from delivery.logs import configure_logging
    from handlers.webhooks.receiver import create_receiver_app

    # The CLI is the process edge, the one place that reads the environment.
    secrets = list(secret or []) or [
        s.strip() for s in os.environ.get(SECRETS_ENV, "").split(",") if s.strip()
    ]
    if not secrets:
        raise typer.BadParameter(f"give --secret or set {SECRETS_ENV}", param_hint="--secret")
    configure_logging(log_level)
    try:
        app = create_receiver_app(secrets, path=path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--secret") from exc
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False)
