"""
Safe starts: one process per data folder, the API port taken before anything else
starts, and start-up failures told in one line.

``delivery run`` keeps its database, its ``nats-server`` store and its key in one
data folder; two instances on one folder would run two schedulers on one SQLite
file and two ``nats-server`` on one JetStream store. :func:`lock_data_dir` takes an
exclusive ``flock`` on ``<data dir>/delivery.lock`` (released by the kernel when the
process dies, even by SIGKILL, so a stale lock cannot block a restart) and names
the holder's pid when it is taken.

:func:`bind_port` binds the API's socket before any side effect (no NATS child
started, no claims released), and hands that socket to uvicorn, so no other
process can take the port in between.

:func:`explain` turns what start-up commonly meets (an unreachable database or
NATS, a bad URL, an unwritable folder, a taken port) into one line for the
operator; the commands print it and exit 1, with the traceback only under
``--debug``.

:func:`require_secret_key` and :func:`check_secret_key` make every part of a
deployment use one ``DELIVERY_SECRET_KEY``, checked at start.
"""

import asyncio
import errno
import fcntl
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from delivery.bus.connect import describe_nats_error
from delivery.secrets import SecretBox, SecretDecryptError
from delivery.settings import Settings
from delivery.store.engine import Engine, describe_database_error, is_sqlite
from delivery.store.facts import SECRET_KEY_CHECK, FactStore

LOCK_FILE: Final = "delivery.lock"
"""Inside the data folder: held while a process runs on that folder."""


class StartupError(Exception):
    """A start-up failure whose message is the one line an operator needs."""


@dataclass
class DataDirLock:
    """An exclusive lock on a data folder, held while the file stays open."""

    path: Path
    fd: int

    def release(self) -> None:
        """Unlock and close (the kernel also does it when the process ends)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def lock_data_dir(data_dir: Path) -> DataDirLock:
    """
    Take the data folder for this process, or fail naming who holds it.

    Raises:
        StartupError: another process holds it, or the folder cannot be written.
    """
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot write the data folder {data_dir}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(
            f"another delivery process (pid {holder}) is running on the data folder "
            f"{data_dir}; stop it first, or give this one its own DELIVERY_DATA_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return DataDirLock(path, fd)


def bind_port(host: str, port: int, *, setting: str = "DELIVERY_PORT") -> socket.socket:
    """
    A listening-ready TCP socket bound to ``host:port`` (``port`` 0: any free port).

    Raises:
        StartupError: the port is taken, or the address is not this machine's.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio's own loop sets TCP_NODELAY only on sockets that say
    # they are TCP (uvloop sets it on every TCP transport), and without it a kept-alive
    # connection waits ~40 ms (Nagle against delayed ACK) on every response written in
    # two parts.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # As uvicorn binds: a restart may reuse the port while old connections linger.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is taken by another process; stop it or set {setting}"
            ) from exc
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.set_inheritable(True)
    return sock


_DESCRIBERS: tuple[Callable[[BaseException], str | None], ...] = (
    describe_database_error,
    describe_nats_error,
)


def explain(exc: BaseException) -> str | None:
    """
    The one line an operator needs for a start-up failure, or ``None`` for one
    that is not a known start-up condition (a bug: its traceback is shown).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StartupError):
            return str(current)
        for describe in _DESCRIBERS:
            line = describe(current)
            if line is not None:
                return line
        if isinstance(current, PermissionError):
            return f"permission denied: {current.filename or current}"
        current = current.__cause__ or current.__context__
    return None


KEY_CHECK_TEXT: Final = "delivery secret key check"


def require_secret_key(settings: Settings, database_url: str) -> None:
    """
    Refuse to start on a shared database without ``DELIVERY_SECRET_KEY``.

    Each process would otherwise make its own key file, and the handlers could not
    open what the API sealed. The embedded SQLite default keeps its generated key
    beside its database, shared by its one process.

    Raises:
        StartupError: not SQLite and no key set.
    """
    if is_sqlite(database_url):
        return
    if settings.secret_key is None or not settings.secret_key.get_secret_value():
        raise StartupError(
            "DELIVERY_SECRET_KEY is required with a PostgreSQL database: every part "
            "(web, scheduler, dispatcher, handlers) must seal and open secrets with the "
            "same key; generate one with `openssl rand -base64 32`"
        )


async def check_secret_key(settings: Settings, engine: Engine, now: datetime) -> None:
    """
    Check this process's key against the deployment's: the first part to start
    seals a value with its key; every part must open it.

    Raises:
        StartupError: this key does not open the value another part sealed.
    """
    box = await asyncio.to_thread(SecretBox.from_settings, settings)
    stored = await FactStore(engine).claim(SECRET_KEY_CHECK, box.seal(KEY_CHECK_TEXT), now)
    try:
        box.open(stored)
    except SecretDecryptError:
        raise StartupError(
            "this process's DELIVERY_SECRET_KEY differs from the key the deployment's "
            "other parts use (it cannot open the check value they sealed); give every "
            "part the same key"
        ) from None


try:
    import uvloop

    _LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # no uvloop for this platform (Windows, PyPy): asyncio's own loop
    _LOOP_FACTORY = None


def run_main(main: Callable[[], Coroutine[Any, Any, None]], *, debug: bool) -> None:
    """
    ``asyncio.run(main())`` for a command, on uvloop's event loop where uvloop is
    installed (it is a dependency wherever it is built): a known failure is
    one line on stderr and exit status 1; anything else (a bug), or any failure with
    ``debug``, keeps its traceback.

    uvloop (libuv in C) rather than asyncio's selector loop: in a trigger-event storm
    on ``delivery run`` the loop's own Python (the selector, socket transports'
    writes and reads, the self-pipe) was a tenth of the busy samples, and two storms
    interleaved with asyncio's loop took 10% and 22% less server CPU per event on
    uvloop (``bench/README.md``).
    """
    try:
        asyncio.run(main(), loop_factory=_LOOP_FACTORY)
    except Exception as exc:
        line = explain(exc)
        if line is None or debug:
            raise
        print(f"delivery: {line}", file=sys.stderr)  # noqa: T201 - the operator's one line
        raise SystemExit(1) from None


MALLOC_ARENAS: Final = 1
"""
The glibc malloc arenas a long-running process may use (glibc's default on 64-bit
is eight per core). A new thread gets an arena of its own at its first malloc while
there are fewer than that, and each aiosqlite connection is a thread: SQLite's page
cache, statements and rows are allocated there. What is freed in an arena serves
only the threads attached to it, so a burst that opens overflow connections of the
pool leaves a few MB in each of several arenas.

Measured with ``bench/bench_rss.py`` (1,000,000 stored, a burst of 100,000 due),
the daemon's RSS at the burst's peak went from 162 MB with glibc's default to
151 MB with one arena, idle 127 / 126 MB; with ``--quick`` (100,000 / 10,000)
148-152 MB against 145 MB, and two arenas gave 146 MB. The threads run SQLite
with the GIL released, so they now share the arena's lock with the loop's
thread; ``bench/bench_burst.py`` measured the burst's time and daemon CPU
against the default (the "Memory" part of ``bench/README.md``).
"""

M_ARENA_MAX: Final = -8
"""``mallopt``'s parameter number for the arena cap (glibc's ``malloc.h``)."""


def cap_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """
    Cap glibc's malloc arenas at ``arenas`` (:data:`MALLOC_ARENAS`) for this
    process; call it before threads start. An operator's ``MALLOC_ARENA_MAX``
    wins (glibc reads it at start), and on another C library (musl) or
    platform nothing changes. Returns whether the cap was set.
    """
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))
