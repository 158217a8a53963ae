"""Make ``zoneinfo`` read the pinned ``tzdata`` package and nothing else.

Why: the system zone files on these machines (tzdata 2025b) disagree with the
pinned package (2026.x) from 2026 on for America/Vancouver, Havana,
Africa/Casablanca and others (measured on these machines). Two
hosts must compute the same fire instants, so the host database is never read.
"""

import importlib.metadata
import zoneinfo

_pinned = False


def pin_tzdata() -> None:
    """
    Point ``zoneinfo`` at the ``tzdata`` package only; idempotent.

    An empty TZPATH makes ``ZoneInfo`` fall back to ``importlib.resources`` on
    the ``tzdata`` package, which is a declared dependency.
    """
    global _pinned
    if _pinned:
        return
    zoneinfo.reset_tzpath(to=())
    zoneinfo.ZoneInfo.clear_cache()
    _pinned = True


def tzdata_version() -> str:
    """The version of the ``tzdata`` package zoneinfo reads, e.g. ``2026.6``."""
    return importlib.metadata.version("tzdata")
