"""
The wheel the container image installs (``pip install .``, not editable) carries every
file the code reads at run time: the console's templates and stylesheet, the
migrations and their templates, the type markers. An editable install reads them from
the work tree, so no other test would notice one missing.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tracked(*folders: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", *folders], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    return [line for line in out.splitlines() if line]


@pytest.mark.slow
def test_the_wheel_carries_every_file_of_the_packages(tmp_path: Path) -> None:
    tracked = _tracked("delivery", "handlers")
    assert "delivery/api/console/templates/base.html" in tracked
    # Built from a copy of the tracked tree, so the work tree gets no build folders.
    source = tmp_path / "src"
    for name in [*tracked, "pyproject.toml", "README.md"]:
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
    # A README beside the code is for its readers, not read at run time.
    missing = sorted(n for n in tracked if n not in packed and not n.endswith(".md"))
    assert missing == [], f"not in the wheel: {missing}"
