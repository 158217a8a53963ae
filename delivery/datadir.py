"""
The embedded default's data folder, readable by the service's own user only.

It holds the SQLite database (every tenant's schedules, messages and contacts), its
``-wal`` and ``-shm`` files, ``secret.key`` (the key that seals secrets at rest) and
the embedded ``nats-server``'s JetStream store (message payloads). Each is created
for its owner alone: folders 0700, files 0600. Where each mode comes from:

- the data folder and the NATS store folder: :func:`ensure_private_dir`;
- ``secret.key``: ``delivery.secrets`` creates it 0600 with ``O_EXCL``;
- the database: :func:`create_private_file` makes it, empty, before SQLite opens it
  (``delivery.store.engine``'s connect hook). SQLite creates ``-wal`` and ``-shm``
  with the mode of their database file (its unix VFS copies it), so they follow;
- what ``nats-server`` writes in its store: 0700 / 0600 by its own defaults (2.15),
  and its process runs under umask 077 (``delivery.embedded``) so a version with
  looser defaults cannot open them.

Why not ``os.umask(0o077)`` once at daemon start: the umask is process-wide state,
read by every library that writes a file and by a test runner hosting the daemon
in-process, it cannot be changed and restored safely while other threads run, and it
does nothing for files an older version already made. Setting each mode where the
file is made keeps the effect to our own files.

Files an older version made (the database 0644, the folder 0755): the files named
here are ours by name, so start-up (:func:`prepare_data_dir`) tightens them and logs
it. The data folder itself is not changed when it already exists: it may be a mount
point, a systemd state directory, or a folder an operator opened to a backup group
on purpose, and with its files closed an open folder shows only their names.
Start-up logs a warning naming its mode instead.
"""

import os
import stat
from pathlib import Path
from typing import Final

import structlog

DATABASE_FILE: Final = "delivery.db"
"""The SQLite file of the embedded default, inside the data folder."""
KEY_FILE: Final = "secret.key"
"""The generated key (when ``DELIVERY_SECRET_KEY`` is unset), inside the data folder."""
NATS_DIR: Final = "nats"
"""The embedded ``nats-server``'s JetStream store, inside the data folder."""

PRIVATE_DIR_MODE: Final = 0o700
PRIVATE_FILE_MODE: Final = 0o600
_GROUP_OTHER: Final = 0o077

_log = structlog.get_logger(__name__)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ensure_private_dir(path: Path, *, tighten: bool) -> None:
    """
    Create the folder ``path`` with mode 0700 (missing parents get the default mode).

    An existing folder that group or others may use is set to 0700 when ``tighten``
    (a folder that is ours by name), else left as it is with a warning.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
        OSError: it cannot be created or changed.
    """
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder") from None
        mode = _mode(path)
        if not mode & _GROUP_OTHER:
            return
        if tighten:
            path.chmod(PRIVATE_DIR_MODE)
            _log.info("data_mode_tightened", path=str(path), was=oct(mode), now=oct(0o700))
        else:
            _log.warning(
                "data_dir_open",
                path=str(path),
                mode=oct(mode),
                hint=f"its files are private; `chmod 700 {path}` hides their names too",
            )
        return
    # mkdir's mode passes through the umask, which could leave the owner without
    # write or search permission; the folder must be exactly 0700.
    path.chmod(PRIVATE_DIR_MODE)


def create_private_file(path: Path) -> None:
    """
    Create ``path`` empty with mode 0600 unless it exists (then it is left alone).

    Raises:
        OSError: its folder is missing or not writable.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def tighten_file(path: Path) -> None:
    """Remove group and other permissions from ``path`` if it exists (logged when changed)."""
    try:
        mode = _mode(path)
    except FileNotFoundError:
        return
    if mode & _GROUP_OTHER:
        path.chmod(mode & ~_GROUP_OTHER)
        _log.info(
            "data_mode_tightened", path=str(path), was=oct(mode), now=oct(mode & ~_GROUP_OTHER)
        )


def prepare_data_dir(data_dir: Path) -> None:
    """
    Make the data folder private and close what an older version left open.

    Creates ``data_dir`` 0700 if missing (an existing one is left, with a warning
    when open, see the module notes), and removes group / other permissions from the
    database, its ``-wal`` and ``-shm``, ``secret.key`` and the NATS store folder.
    Blocking file I/O: call it at start-up (``asyncio.to_thread`` from a loop).

    Raises:
        OSError: the folder cannot be created, or a mode cannot be changed.
    """
    ensure_private_dir(data_dir, tighten=False)
    for name in (DATABASE_FILE, f"{DATABASE_FILE}-wal", f"{DATABASE_FILE}-shm", KEY_FILE):
        tighten_file(data_dir / name)
    store = data_dir / NATS_DIR
    if store.is_dir():
        ensure_private_dir(store, tighten=True)
