"""
``delivery web``: the REST API alone, under uvicorn (the Procfile's ``web`` process).

:func:`serve_api` is the reusable part: ``delivery run`` can call it with the
daemon's waker and clock to host the API in the same process.
"""

from functools import partial

import structlog
import typer
import uvicorn

from delivery import tracing
from delivery.api import Wakeable, create_app
from delivery.api.auth import bootstrap_key
from delivery.api.serving import server_config
from delivery.bus.subjects import Subjects
from delivery.clock import Clock, SystemClock
from delivery.commands.store import prepare_database
from delivery.logs import configure_logging
from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.startup import bind_port, check_secret_key, require_secret_key, run_main
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore

_log = structlog.get_logger(__name__)


async def serve_api(
    settings: Settings,
    *,
    clock: Clock | None = None,
    waker: Wakeable | None = None,
    store: SqlStore | None = None,
) -> None:
    """
    Migrate the database, then serve the API on ``settings.host:port`` until stopped.

    Args:
        clock: defaults to the system clock.
        waker: nudged after writes that may make work due sooner.
        store: reuse a store (its engine is then the caller's to dispose);
            by default one is built on the configured database and disposed here.
    """
    clock = clock or SystemClock()
    url = settings.resolved_database_url()
    require_secret_key(settings, url)
    # Taken before the migrations: a taken port fails before anything is written.
    sock = bind_port(settings.host, settings.port)
    engine = None
    try:
        url = prepare_database(settings)
        await migrate(url, secrets=partial(SecretBox.for_migration, settings))
        if store is None:
            engine = create_engine(url)
            store = SqlStore(engine, subjects=Subjects(settings.subject_prefix))
        await check_secret_key(settings, store.engine, clock.now())
        await bootstrap_key(settings, store, clock)
        app = create_app(settings, store, clock, waker)
        config = server_config(app, settings)
        _log.info(
            "serving the API",
            host=settings.host,
            port=settings.port,
            docs="/docs",
            console="/console",
        )
        await uvicorn.Server(config).serve(sockets=[sock])
    finally:
        sock.close()
        if engine is not None:
            await engine.dispose()


def web(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of a start-up failure."),
) -> None:
    """Serve the REST API (OpenAPI at /docs); applies migrations first."""
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    tracing.configure(settings.otel_exporter, service="delivery-web")
    try:
        run_main(lambda: serve_api(settings), debug=debug)
    finally:
        tracing.shutdown()


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("web", help="Serve the REST API (applies migrations on start).")(web)
