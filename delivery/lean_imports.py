"""
Imported first by the ``delivery`` command: structlog and httpx without their terminal extras.

Both load Rich, Pygments or Click at import time whenever they are installed, which
they are (Typer depends on Rich): ``structlog.dev`` for coloured console tracebacks,
``httpx._main`` for the ``httpx`` command-line client. That was 61 Rich and 14
Pygments modules, 3.4 MB of RSS in every process once ``delivery run``'s modules are
imported, and ``delivery run`` must stay within 150 MB in a burst
(``bench/bench_rss.py``: 149-151 MB at its peak before, 146-147 after). Neither is used
here: JSON logs never needed Rich, the console renderer prints plain tracebacks without
it, and nothing runs httpx's CLI.

Importing this module imports the two with those packages hidden (``sys.modules[name]
= None`` makes their import raise the ImportError both libraries catch), then shows
them again, so Typer still loads Rich on its own when it formats help or an error. It
is done by the command's module rather than by the ``delivery`` package, so importing
a pure part of the package (``delivery.cadence``) still loads neither library. A
process that imported any of them before keeps what it has.
"""

import importlib
import sys

TERMINAL_EXTRAS = ("click", "pygments", "rich")
"""Packages that structlog and httpx load at import whenever they are installed."""

_LOAD_EXTRAS_AT_IMPORT = ("structlog", "httpx")


def import_without_terminal_extras() -> None:
    """Import structlog and httpx with :data:`TERMINAL_EXTRAS` hidden (see the module)."""
    if any(name in sys.modules for name in TERMINAL_EXTRAS):
        return
    missing = [name for name in _LOAD_EXTRAS_AT_IMPORT if name not in sys.modules]
    for name in TERMINAL_EXTRAS:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        for name in missing:
            importlib.import_module(name)
    finally:
        for name in TERMINAL_EXTRAS:
            del sys.modules[name]


import_without_terminal_extras()
