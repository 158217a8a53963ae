"""
What ``delivery run`` does not load until it is used.

Each of these costs RSS in every daemon (measured by ``bench/bench_rss.py``): the
OpenTelemetry SDK (~0.7 MB, with psutil ~0.8 MB more) while tracing is off, and
aiohttp's server (~1.6 MB), which only the processes without the API serve their ops
port with; Rich and Pygments (~3-6 MB), which structlog and httpx would load at import
for a terminal nothing here uses. A fresh interpreter imports what ``delivery run``
imports and must find none of them loaded.
"""

import os
import subprocess
import sys

import pytest

DAEMON_MODULES = (
    "delivery.cli",
    "delivery.daemon",
    "delivery.api.app",
    "delivery.dispatcher.app",
    "handlers.runner",
    "delivery.outbox",
    "delivery.scheduler",
)


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter, 100 columns wide for Typer's help."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )


NOT_LOADED = ("opentelemetry.sdk", "psutil", "aiohttp.web", "rich", "pygments")


@pytest.mark.parametrize("module", NOT_LOADED)
def test_the_daemon_does_not_import(module: str) -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in DAEMON_MODULES)
        + f"print({module!r} in sys.modules)\n"
    )
    out = _python("-c", code)
    assert out.stdout.strip() == "False", f"{module} is imported at start-up"


def test_tracing_still_turns_on() -> None:
    """The SDK, loaded on first use by ``configure``, still records spans."""
    code = (
        "from delivery import tracing\n"
        "tracing.configure('console', service='t')\n"
        "assert tracing.enabled()\n"
        "tracing.shutdown()\n"
        "print('ok')\n"
    )
    out = _python("-c", code)
    assert out.stdout.strip().endswith("ok")


def test_console_logs_and_cli_help_work_without_rich_loaded_at_import() -> None:
    """The console renderer prints a plain traceback; Typer's help still loads Rich."""
    code = (
        "import sys\n"
        "import delivery.cli\n"
        "from delivery.logs import configure_logging\n"
        "import structlog\n"
        "configure_logging('INFO', json=False)\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    structlog.get_logger('t').exception('failed')\n"
        "print('rich' in sys.modules)\n"
    )
    out = _python("-c", code)
    assert out.stdout.strip() == "False"
    assert "failed" in out.stderr
    assert "ZeroDivisionError: division by zero" in out.stderr
    helped = _python("-m", "delivery", "--help")
    # Rich's panels: Typer found Rich after the package hid it for its own imports.
    assert "─ Commands ─" in helped.stdout
