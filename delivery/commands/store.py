"""
``delivery migrate`` and ``delivery keys``: the store's operator commands.

``migrate`` applies the Alembic migrations to the configured database
(``DELIVERY_DATABASE_URL``, else SQLite in ``DELIVERY_DATA_DIR``). ``keys create``
makes a project if needed and prints a new API key, the only time it is shown;
``keys list`` shows keys by their first characters, ``keys revoke`` ends one and
``keys rotate`` replaces one, optionally keeping the old one alive for a grace
period. A running API caches a resolved key for ``DELIVERY_AUTH_CACHE_TTL_S``
seconds (30 by default), so a revocation takes effect there within that time.
``prune`` deletes history older than ``DELIVERY_RETENTION_DAYS``
(:mod:`delivery.retention`) and prints the rows per table.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from pathlib import Path

import typer

from delivery.cadence import format_utc
from delivery.clock import SystemClock
from delivery.datadir import prepare_data_dir
from delivery.logs import configure_logging
from delivery.retention import Retention
from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.startup import run_main
from delivery.store.engine import create_engine, is_sqlite
from delivery.store.keys import Keys
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


def _migrate_command(
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of a failure."),
) -> None:
    """Apply every pending migration to the configured database."""
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)

    async def apply() -> None:
        url = prepare_database(settings)
        await migrate(url, secrets=partial(SecretBox.for_migration, settings))

    run_main(apply, debug=debug)
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


async def _with_keys[T](settings: Settings, action: Callable[[Keys], Awaitable[T]]) -> T:
    url = prepare_database(settings)
    await migrate(url, secrets=partial(SecretBox.for_migration, settings))
    engine = create_engine(url)
    try:
        return await action(SqlStore(engine).keys)
    finally:
        await engine.dispose()


def _run_keys[T](action: Callable[[Keys], Awaitable[T]]) -> T:
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    return asyncio.run(_with_keys(settings, action))


@keys_app.command("list")
def list_keys(
    project: str | None = typer.Option(None, "--project", help="Only this project's keys."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """List keys by id and first characters, with when each was revoked."""
    infos = _run_keys(lambda keys: keys.list_keys(project))
    for info in infos:
        if as_json:
            typer.echo(json.dumps(info.as_json()))
        else:
            revoked = (
                "active" if info.revoked_at is None else f"revoked {format_utc(info.revoked_at)}"
            )
            typer.echo(f"{info.id}  {info.prefix}…  {info.project_name}  {revoked}")


@keys_app.command("revoke")
def revoke_key(key_id: str = typer.Argument(..., help="The key's id (from `keys list`).")) -> None:
    """Revoke a key now (a running API stops accepting it within its cache time)."""
    now = SystemClock().now()
    settings = Settings()
    info = _run_keys(lambda keys: keys.revoke_key(key_id, now))
    if info is None:
        typer.echo(f"no key with id {key_id!r}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"revoked {info.id} ({info.prefix}…, {info.project_name}); running APIs stop "
        f"accepting it within {settings.auth_cache_ttl_s:g} s (DELIVERY_AUTH_CACHE_TTL_S)",
        err=True,
    )


@keys_app.command("rotate")
def rotate_key(
    key_id: str = typer.Argument(..., help="The key to replace (from `keys list`)."),
    grace_seconds: int = typer.Option(
        0, "--grace-seconds", min=0, max=30 * 24 * 3600, help="Keep the old key working this long."
    ),
) -> None:
    """Print a new key for the same project; the old one ends after the grace period."""
    now = SystemClock().now()
    grace = timedelta(seconds=grace_seconds)
    rotated = _run_keys(lambda keys: keys.rotate_key(key_id, now, grace=grace))
    if rotated is None:
        typer.echo(f"no working key with id {key_id!r}", err=True)
        raise typer.Exit(1)
    info, key = rotated
    typer.echo(
        f"project: {info.project_name} ({info.project_id}); new key {info.id}; "
        f"{key_id} ends at {format_utc(now + grace)}",
        err=True,
    )
    typer.echo(key)


async def _prune(settings: Settings) -> dict[str, int]:
    url = prepare_database(settings)
    await migrate(url, secrets=partial(SecretBox.for_migration, settings))
    engine = create_engine(url)
    try:
        report = await Retention.from_settings(settings, engine, SystemClock()).prune_all()
    finally:
        await engine.dispose()
    return report.rows


def _prune_command() -> None:
    """Delete history older than DELIVERY_RETENTION_DAYS now (the daemon also does it hourly)."""
    settings = Settings()
    configure_logging(settings.log_level, json=settings.log_json)
    rows = asyncio.run(_prune(settings))
    for table, deleted in rows.items():
        typer.echo(f"{table}: {deleted}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("prune", help="Prune fires, attempts, schedule changes and consumed messages now.")(
        _prune_command
    )
    app.command("migrate", help="Apply database migrations (SQLite or PostgreSQL).")(
        _migrate_command
    )
    app.add_typer(keys_app)
