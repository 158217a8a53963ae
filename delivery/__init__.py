"""Proactive delivery service: schedules, wakeups and trigger events become messages.

Importing this package pins ``zoneinfo`` to the ``tzdata`` package (see
:mod:`delivery.tz`), so every process that touches our code computes the same
instants whatever zone files the host carries, and imports structlog and httpx
without their optional terminal extras (:func:`_import_without_terminal_extras`).
"""

import importlib
import sys

from delivery.tz import pin_tzdata

__version__ = "0.1.0"

TERMINAL_EXTRAS = ("click", "pygments", "rich")
"""Packages that structlog and httpx load at import whenever they are installed."""

_LOAD_EXTRAS_AT_IMPORT = ("structlog", "httpx")


def _import_without_terminal_extras() -> None:
    """
    Import structlog and httpx with Rich, Pygments and Click hidden, then show them again.

    Both load them at import time when they are installed, which they are (Typer
    depends on Rich): ``structlog.dev`` for coloured console tracebacks,
    ``httpx._main`` for the ``httpx`` command-line client. That was 61 Rich and 14
    Pygments modules, 3.4 MB of RSS in every process once ``delivery run``'s modules
    are imported, and ``delivery run`` must stay within 150 MB in a burst
    (``bench/bench_rss.py``: 149-151 MB at its peak before, 147 after). Neither is used
    here: JSON logs never needed Rich, the console renderer prints plain tracebacks
    without it, and nothing runs httpx's CLI. Both libraries catch the ImportError and
    go on without them. Typer loads Rich on its own when it formats help or an error,
    and still can: the packages are hidden only while these two are imported. A
    process that imported any of them before this package keeps what it has.
    """
    if any(name in sys.modules for name in TERMINAL_EXTRAS):
        return
    missing = [name for name in _LOAD_EXTRAS_AT_IMPORT if name not in sys.modules]
    # A None entry makes "import rich" raise ImportError, which both libraries catch.
    for name in TERMINAL_EXTRAS:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for name in missing:
            importlib.import_module(name)
    finally:
        for name in TERMINAL_EXTRAS:
            del sys.modules[name]


_import_without_terminal_extras()
pin_tzdata()
