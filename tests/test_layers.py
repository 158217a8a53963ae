"""
The layers keep their order: no module imports one from a higher layer.

From the bottom: pure values and rules, then the NATS contract with the settings,
then the store, then the processes (scheduler, relay, dispatcher, workbench,
handlers, API), then the daemon and the CLI that wire them. Every module of
``delivery/`` and ``handlers/`` must be placed in exactly one layer, so a new
module is a conscious choice, not an accident.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "values",
        (
            "delivery",
            "delivery.errors",
            "delivery.clock",
            "delivery.tz",
            "delivery.logs",
            "delivery.jsontext",
            "delivery.domain",
            "delivery.cadence",
            "delivery.planning",
            "delivery.policy",
            "delivery.templates",
            "delivery.timeline",
            "delivery.explain",
            "handlers",
            "handlers.base",
            "handlers.classify",
            "handlers.retry",
            "handlers.webhooks.signing",
        ),
    ),
    (
        "bus, settings and runtime",
        (
            "delivery.bus",
            "delivery.settings",
            "delivery.secrets",
            "delivery.loops",
            "delivery.handoff",
            "delivery.datadir",
            "delivery.metrics",
            "delivery.tracing",
        ),
    ),
    ("store", ("delivery.store",)),
    (
        "processes",
        (
            "delivery.scheduler",
            "delivery.retention",
            "delivery.outbox",
            "delivery.ops",
            "delivery.dispatcher",
            "delivery.workbench",
            "delivery.api",
            "handlers.webhooks",
            "handlers.ssrf",
            "handlers.contacts",
            "handlers.fallback",
            "handlers.email",
            "handlers.provider_http",
            "handlers.fcm",
            "handlers.sms",
            "handlers.fanout",
            "handlers.forwarding",
            "handlers.queue",
            "handlers.notification_channels",
            "handlers.channels_worker",
            "handlers.runner",
        ),
    ),
    (
        "daemon and CLI",
        (
            "delivery.daemon",
            "delivery.startup",
            "delivery.embedded",
            "delivery.commands",
            "delivery.cli",
            "delivery.lean_imports",
            "delivery.__main__",
        ),
    ),
)


PACKAGE_FACES = {"delivery", "handlers"}
"""Entries that place the package's own ``__init__`` only, not everything below it."""


def layer_of(module: str) -> int:
    """The layer of ``module``: the one holding its longest matching prefix."""
    best, rank = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            below = module.startswith(prefix + ".") and prefix not in PACKAGE_FACES
            if (module == prefix or below) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def modules() -> dict[str, Path]:
    found = {}
    for package in ("delivery", "handlers"):
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """First-party modules ``path`` imports, at any depth (function-local imports too)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named.add(node.module)
        elif isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
    return {n for n in named if n.split(".")[0] in ("delivery", "handlers")}


def test_every_module_has_a_layer() -> None:
    """Each module of delivery/ and handlers/ is placed in a layer."""
    assert [m for m in sorted(modules()) if layer_of(m) < 0] == []


def test_no_import_runs_up_the_layers() -> None:
    """No module imports a module of a higher layer."""
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, path in sorted(modules().items())
        for target in sorted(imports(path))
        if layer_of(target) > layer_of(module)
    ]
    assert upward == []


TYPE_ONLY_SQL = {("sqlalchemy.engine", "RowMapping"), ("sqlalchemy.ext.asyncio", "AsyncEngine")}
"""What a module outside the store may take from SQLAlchemy: the names of a row and an
engine, to pass them on; nothing that builds or runs a statement."""


def test_no_sql_outside_the_store() -> None:
    """Only delivery/store/ builds SQL: elsewhere SQLAlchemy is imported for type names only."""
    found = []
    for module, path in sorted(modules().items()):
        if module == "delivery.store" or module.startswith("delivery.store."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [f"{module}: import {a.name}" for a in node.names if _is_sql(a.name)]
            elif isinstance(node, ast.ImportFrom) and node.module and _is_sql(node.module):
                found += [
                    f"{module}: from {node.module} import {a.name}"
                    for a in node.names
                    if (node.module, a.name) not in TYPE_ONLY_SQL
                ]
    assert found == []


def _is_sql(name: str) -> bool:
    return name.split(".")[0] in {"sqlalchemy", "sqlmodel", "sqlite3", "asyncpg", "aiosqlite"}
