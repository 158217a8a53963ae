"""The cadence engine is pure (no clock, no I/O, no storage or bus imports)."""

import ast
import subprocess
import sys
from pathlib import Path

import delivery.cadence

PACKAGE = Path(delivery.cadence.__file__).parent
FORBIDDEN_MODULES = {
    "sqlmodel",
    "sqlalchemy",
    "nats",
    "faststream",
    "httpx",
    "aiohttp",
    "structlog",
}
FORBIDDEN_CALLS = {"now", "utcnow", "today", "time", "monotonic", "open", "sleep"}


def test_importing_the_engine_pulls_in_no_io_libraries() -> None:
    """A fresh interpreter that imports delivery.cadence loads no storage, bus or HTTP module."""
    code = (
        "import sys, delivery.cadence; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN_MODULES)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_engine_source_never_reads_a_clock_or_opens_files() -> None:
    """No module under delivery/cadence calls now(), today(), time(), open() or sleep()."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in FORBIDDEN_CALLS:
                    offenders.append(f"{path.name}:{node.lineno} {name}()")
    assert offenders == []
