"""
``delivery migrate`` and ``delivery keys create``: the store's operator commands.

``migrate`` applies the Alembic migrations to the configured database
(``DELIVERY_DATABASE_URL``, else SQLite in ``DELIVERY_DATA_DIR``); ``keys create``
makes a project if needed and prints a new API key, the only time it is shown.
"""

import asyncio
from functools import partial
from pathlib import Path

import typer

from delivery.clock import SystemClock
from delivery.datadir import prepare_data_dir
from delivery.logs import configure_logging
from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store.engine import create_engine, is_sqlite
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore

keys_app = typer.Typer(
    name="keys", help="API keys (stored hashed).", no_args_is_help=True, add_completion=False
)


def prepare_database(settings: Settings) -> str:
    """
    The database URL, with the SQLite data directory created (private, see
    ``delivery.datadir``) when that is the target.

    Returns:
        ``settings.resolved_database_url()``.
    """
    url = settings.resolved_database_url()
    if is_sqlite(url) and not settings.database_url:
        prepare_data_dir(Path(settings.data_dir))
    return url


def _migrate_command() -> None:
    """Apply every pending migration to the configured database."""
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    url = prepare_database(settings)
    asyncio.run(migrate(url, secrets=partial(SecretBox.for_migration, settings)))
    typer.echo("database is up to date")


async def _create_key(settings: Settings, project_name: str) -> tuple[str, str]:
    url = prepare_database(settings)
    await migrate(url, secrets=partial(SecretBox.for_migration, settings))
    engine = create_engine(url)
    try:
        store = SqlStore(engine)
        now = SystemClock().now()
        project = await store.keys.ensure_project(project_name, now)
        key = await store.keys.create_api_key(project.id, now)
        return project.id, key
    finally:
        await engine.dispose()


@keys_app.command("create")
def create_key(
    project: str = typer.Option(..., "--project", help="Project name; created if it is new."),
) -> None:
    """Create an API key for PROJECT and print it (it cannot be shown again)."""
    name = project.strip()
    if not name or len(name) > 128:
        raise typer.BadParameter("--project must be 1 to 128 characters")
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    project_id, key = asyncio.run(_create_key(settings, name))
    typer.echo(f"project: {name} ({project_id})", err=True)
    typer.echo(key)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("migrate", help="Apply database migrations (SQLite or PostgreSQL).")(
        _migrate_command
    )
    app.add_typer(keys_app)
