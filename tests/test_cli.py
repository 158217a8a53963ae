"""The console script's basics."""

import subprocess
import sys

from delivery import __version__


def test_version_prints_package_version() -> None:
    """`delivery --version` prints the installed version."""
    out = subprocess.run(
        [sys.executable, "-m", "delivery", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"delivery {__version__}"


def test_zoneinfo_reads_only_pinned_tzdata() -> None:
    """Importing delivery empties TZPATH, so zones come from the tzdata package alone."""
    code = "import delivery, zoneinfo; print(repr(zoneinfo.TZPATH))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "()"
