"""
``delivery run | scheduler | dispatcher | handlers``: the long-running processes.

``run`` is the embedded default (every part in one process, SQLite in the data dir,
its own ``nats-server`` unless ``DELIVERY_NATS_URL`` is set); the others run one part
each against PostgreSQL and an external NATS, as the ``Procfile`` names them.
"""

import asyncio

import typer

from delivery import tracing
from delivery.daemon import ALL_PARTS, Daemon, Part
from delivery.logs import configure_logging
from delivery.settings import Settings
from delivery.startup import cap_malloc_arenas, run_main


async def _serve(settings: Settings, parts: frozenset[Part], *, embedded_nats: bool) -> None:
    daemon = Daemon(settings, parts=parts, embedded_nats=embedded_nats)
    running = asyncio.create_task(daemon.run())
    ready = asyncio.create_task(daemon.ready.wait())
    done, _ = await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done:
        _banner(settings, daemon)
    else:
        ready.cancel()
    await running


def _banner(settings: Settings, daemon: Daemon) -> None:
    lines = [f"delivery is running: {', '.join(sorted(daemon.parts))}"]
    if daemon.api_url:
        lines.append(f"  API        {daemon.api_url}  (OpenAPI docs at {daemon.api_url}/docs)")
        lines.append(f"  console    {daemon.api_url}/console  (sign in with an API key)")
    if daemon.ops_url:
        lines.append(f"  ops        {daemon.ops_url}/health  /ready  /metrics")
    lines.append(f"  NATS       {daemon.nats_url}")
    if not settings.database_url:
        lines.append(f"  data       {settings.data_dir.resolve()}")
    if Part.API in daemon.parts:
        lines.append("  API key    delivery keys create --project NAME   (printed once)")
    lines.append("  stop       Ctrl+C or SIGTERM (drains in-flight work)")
    typer.echo("\n".join(lines), err=True)


DEBUG = typer.Option(False, "--debug", help="Show the traceback of a start-up failure.")


def _launch(parts: frozenset[Part], *, embedded_nats: bool, debug: bool) -> None:
    # Before any thread starts (each SQLite connection is one): see MALLOC_ARENAS.
    cap_malloc_arenas()
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    name = "delivery" if parts == ALL_PARTS else f"delivery-{'-'.join(sorted(parts))}"
    tracing.configure(settings.otel_exporter, service=name)
    try:
        run_main(lambda: _serve(settings, parts, embedded_nats=embedded_nats), debug=debug)
    finally:
        tracing.shutdown()


def run(debug: bool = DEBUG) -> None:
    """API, scheduler, dispatcher and handlers in one process (the embedded default)."""
    _launch(ALL_PARTS, embedded_nats=True, debug=debug)


def scheduler(debug: bool = DEBUG) -> None:
    """Claim due schedules and wakeups, write fires + outbox, relay the outbox to NATS."""
    _launch(frozenset({Part.SCHEDULER}), embedded_nats=False, debug=debug)


def dispatcher(debug: bool = DEBUG) -> None:
    """Consume fire / wakeup / event messages and create exactly one notification each."""
    _launch(frozenset({Part.DISPATCHER}), embedded_nats=False, debug=debug)


def handlers(debug: bool = DEBUG) -> None:
    """Fan notifications out to webhooks, push, email and SMS."""
    _launch(frozenset({Part.HANDLERS}), embedded_nats=False, debug=debug)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("run", help="Run everything in one process (embedded SQLite + NATS).")(run)
    app.command("scheduler", help="Run the scheduler (needs DELIVERY_NATS_URL).")(scheduler)
    app.command("dispatcher", help="Run the dispatcher (needs DELIVERY_NATS_URL).")(dispatcher)
    app.command("handlers", help="Run the notification handlers (needs DELIVERY_NATS_URL).")(
        handlers
    )
