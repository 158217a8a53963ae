"""
README.md's two commands, exactly as written there, on a clean clone of HEAD, with a PATH
whose ``python3`` is older than 3.12 and, where pyenv is installed, whose ``python3.12`` is
the pyenv shim that answers "command not found" (a fresh machine with pyenv, as CI's).

Uncommitted changes are not in the clone: commit before running this test.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest

from delivery.embedded import free_port
from tests.conftest import services_required

ROOT = Path(__file__).resolve().parents[1]

# Starting includes building .venv from scratch: a minute or two here, since HOME is kept
# and so pip's cache and configuration are reused.
START_WITHIN_S = 300

PROBE = '''
import json, os, sys

def test_probe():
    """Records which interpreter the README's test command ran pytest with."""
    with open(os.environ["README_PROBE_OUT"], "w") as out:
        json.dump({"version": list(sys.version_info[:3]), "prefix": sys.prefix}, out)
'''


def readme_command(readme: Path, marker: str) -> str:
    """The ``sh`` code block right under ``<!-- marker -->`` in ``readme``."""
    lines = readme.read_text().splitlines()
    start = lines.index(f"<!-- {marker} -->")
    assert lines[start + 1] == "```sh", f"no sh block under <!-- {marker} -->"
    end = lines.index("```", start + 2)
    return "\n".join(lines[start + 2 : end])


def readme_example(readme: Path, heading: str, port: int) -> str:
    """The first ``sh`` block after ``heading``, sent to ``port`` instead of the default 8080."""
    lines = readme.read_text().splitlines()
    start = lines.index("```sh", lines.index(heading))
    block = "\n".join(lines[start + 1 : lines.index("```", start + 1)])
    assert "127.0.0.1:8080" in block
    return block.replace("127.0.0.1:8080", f"127.0.0.1:{port}")


def older_python() -> str | None:
    """A working Python older than 3.12 on this machine (the default python3 here), or None."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = ["python3", "/usr/bin/python3"]
    candidates += [str(p) for p in sorted((pyenv / "versions").glob("3.*/bin/python3"))[::-1]]
    code = "import sys; print(sys.executable); sys.exit(sys.version_info >= (3, 12))"
    for candidate in candidates:
        try:
            out = subprocess.run([candidate, "-c", code], capture_output=True, text=True)
        except OSError:
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def fresh_machine_env(tmp_path: Path) -> dict[str, str]:
    """This environment, less what would pick a Python or a venv, with an old python3 first."""
    old = older_python()
    if old is None:
        message = "no Python older than 3.12 on this machine to stand in for python3"
        if services_required():
            pytest.fail(message)
        pytest.skip(message)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(old)
    path = [str(bin_dir)]
    shims = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "shims"
    if shims.is_dir():
        path.append(str(shims))
    path += ["/usr/bin", "/bin"]
    dropped = {"PYTHON", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_ADDOPTS"}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith(("DELIVERY_", "PYENV_VERSION"))
    }
    env["PATH"] = os.pathsep.join(path)
    return env


def clone_head(dest: Path) -> None:
    """A clean clone of the commit checked out here (no .venv, no data, no local changes)."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "-q", head], check=True)


def nats_servers_of(clone: Path) -> list[psutil.Process]:
    """nats-server processes whose store lies inside ``clone``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and "nats-server" in cmdline[0] and any(str(clone) in a for a in cmdline):
            found.append(proc)
    return found


def wait_for_health(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Until the service answers /health on ``port``; fails at once if it exits first."""
    deadline = time.monotonic() + START_WITHIN_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run command exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"no /health answer within {START_WITHIN_S} s:\n{log.read_text()}")


@pytest.mark.slow
def test_readme_commands_work_as_typed_with_an_old_default_python(tmp_path):
    """The README's run command serves /health, its first-message example gets the message,
    Ctrl+C stops it cleanly, and its test command runs pytest under Python >= 3.12 from the
    .venv that the run command built."""
    env = fresh_machine_env(tmp_path)
    clone = tmp_path / "clone"
    clone_head(clone)
    readme = clone / "README.md"
    port = free_port()
    log = tmp_path / "run.log"

    with log.open("wb") as out:
        # Its own process group, so SIGINT reaches it as a terminal's Ctrl+C would.
        proc = subprocess.Popen(
            ["bash", "-c", readme_command(readme, "run-command")],
            cwd=clone,
            env={**env, "DELIVERY_PORT": str(port)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_health(proc, port, log)
        example = readme_example(readme, "## A first proactive message", port)
        shown = subprocess.run(
            ["bash", "-c", example], cwd=clone, env=env, capture_output=True, text=True, timeout=90
        )
        assert (
            '"generated_message":"Hi! Just checking in on how you are feeling."' in shown.stdout
        ), shown.stdout + shown.stderr
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert nats_servers_of(clone) == []

    stamp = clone / ".venv" / ".dev-inputs"
    built_at = stamp.stat().st_mtime_ns
    (clone / "tests" / "test_readme_probe.py").write_text(PROBE)
    probe_out = tmp_path / "probe.json"
    # pytest prepends PYTEST_ADDOPTS to the command's own arguments: the command runs as
    # written, but collects only the probe, not this suite (which holds this very test).
    result = subprocess.run(
        ["bash", "-c", readme_command(readme, "test-command")],
        cwd=clone,
        env={
            **env,
            "PYTEST_ADDOPTS": "tests/test_readme_probe.py",
            "README_PROBE_OUT": str(probe_out),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    probe = json.loads(probe_out.read_text())
    assert tuple(probe["version"]) >= (3, 12)
    assert Path(probe["prefix"]).resolve() == (clone / ".venv").resolve()
    assert stamp.stat().st_mtime_ns == built_at, "the test command built .venv again"
