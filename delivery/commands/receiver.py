"""`delivery receiver`: serve the tenant-side webhook receiver standalone (issues 5, 6)."""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from delivery.settings import Settings
    from handlers.forwarding import FileContactDirectory

SECRETS_ENV = "DELIVERY_RECEIVER_SECRETS"
CONTACTS_ENV = "DELIVERY_RECEIVER_CONTACTS"

SEND_TIMEOUT = timedelta(seconds=4)
"""Bound on one provider send when forwarding: the sender waits on the open request
(15 s by default) and the forwarder's retry budget (8 s) assumes sends of a few seconds."""


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
    contacts: Annotated[
        Path | None,
        typer.Option(
            envvar=CONTACTS_ENV,
            dir_okay=False,
            help="JSON file of users' push / email / SMS destinations (format: "
            "handlers/webhooks/README.md). When given, each event is sent through the "
            "providers configured by DELIVERY_FCM_* / DELIVERY_SMTP_* / DELIVERY_SMS_*; "
            "otherwise it is only logged.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Verify signed webhook deliveries (either scheme) and forward or log each one once."""
    # Imported here so other commands do not pay for FastAPI and uvicorn at start-up.
    import uvicorn

    from delivery.logs import configure_logging
    from delivery.settings import Settings
    from handlers.forwarding import ContactsFileError, FileContactDirectory
    from handlers.webhooks.receiver import create_receiver_app
    from handlers.webhooks.signing import SigningKey

    # The CLI is the process edge, the one place that reads the environment.
    secrets = list(secret or []) or [
        s.strip() for s in os.environ.get(SECRETS_ENV, "").split(",") if s.strip()
    ]
    if not secrets:
        raise typer.BadParameter(f"give --secret or set {SECRETS_ENV}", param_hint="--secret")
    try:
        for value in secrets:
            SigningKey.parse(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--secret") from exc
    directory = None
    if contacts is not None:
        # Validated before anything starts: a bad entry must stop the receiver, not
        # surface as a lost message on the first event for that user.
        try:
            directory = FileContactDirectory.load(contacts)
        except ContactsFileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--contacts") from exc
    configure_logging(log_level)
    if directory is None:
        app = create_receiver_app(secrets, path=path)
    else:
        app = _forwarding_app(Settings(), directory, secrets, path=path)
    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False)


def _forwarding_app(
    settings: "Settings", directory: "FileContactDirectory", secrets: list[str], *, path: str
) -> "FastAPI":
    """
    The receiver app with a ChannelForwarder over the providers ``settings`` configure.

    The providers are built here, before serving, so a half-configured one stops the
    command with a usage error; their HTTP client is closed by the app's lifespan, which
    uvicorn runs on SIGINT / SIGTERM before it re-raises the signal and the process ends.
    """
    import structlog
    from fastapi import FastAPI

    from delivery.clock import SystemClock
    from handlers.fanout import ChannelRouter, channels_from_settings, provider_http_client
    from handlers.forwarding import ChannelForwarder
    from handlers.webhooks.receiver import create_receiver_router

    # No connection is opened yet: the aiohttp session starts on first use, on
    # uvicorn's event loop.
    client = provider_http_client(timeout=SEND_TIMEOUT)
    try:
        channels = channels_from_settings(settings, client=client, clock=SystemClock())
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(
            f"channel settings: {exc}",
            param_hint="DELIVERY_FCM_* / DELIVERY_SMTP_* / DELIVERY_SMS_*",
        ) from exc
    router = ChannelRouter(channels, send_timeout=SEND_TIMEOUT)
    forwarder = ChannelForwarder(router, directory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            try:
                yield
            finally:
                # The pooled SMTP connections belong to this loop too.
                await router.aclose()
        # Evidence for operators (and the tests) that shutdown got this far.
        structlog.get_logger(__name__).info("receiver.channels_closed")

    # Built here rather than with create_receiver_app, which has no lifespan to hang
    # the client's shutdown on; the routes are the same.
    app = FastAPI(
        title="sonzai-delivery webhook receiver", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.include_router(create_receiver_router(secrets, forwarder=forwarder, path=path))

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
