"""The console script's basics."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_a_bad_setting_is_named_and_nothing_starts(tmp_path: Path) -> None:
    """An out-of-range DELIVERY_* variable: exit 2, the variable named, no data dir made."""
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env.update(DELIVERY_DATA_DIR=str(data), DELIVERY_LOOKAHEAD_S="60")
    out = subprocess.run(
        [sys.executable, "-m", "delivery", "run"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2
    assert out.stderr == (
        "invalid configuration:\n"
        "DELIVERY_LOOKAHEAD_S: Input should be less than or equal to 59 (got '60')\n"
    )
    assert not data.exists()
