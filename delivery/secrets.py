"""
Encryption at rest for tenant secrets (webhook signing secrets, ``auth_header``):
DESIGN invariant 6, "secrets are stored hashed or encrypted".

Values are sealed with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``), so a
tampered or foreign ciphertext fails loudly instead of decrypting to garbage. The key:

- ``DELIVERY_SECRET_KEY`` when set: any text; the Fernet key is derived from it with
  HKDF-SHA256, so an operator can use a password-manager string. Every process of a
  deployment (web, handlers) must share it.
- otherwise ``<data_dir>/secret.key``: 32 random bytes, created once with mode 0600 on
  first use (the embedded default, where every part shares the data folder). Losing
  that file makes the stored secrets unreadable: back it up with the database.

Signing needs the secret itself (HMAC), so it is encrypted, not hashed.
"""

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from delivery import datadir
from delivery.settings import Settings

if TYPE_CHECKING:
    pass

# ``cryptography`` is imported where a box is built, not here: about 7 MB that a
# process that never seals anything (no webhooks, no idempotent POSTs yet) never pays.

KEY_FILE = datadir.KEY_FILE
"""File name of the generated key inside ``data_dir``."""

_HKDF_INFO = b"sonzai-delivery secrets at rest v1"
_log = structlog.get_logger(__name__)


class SecretDecryptError(Exception):
    """A stored value does not decrypt with this key (wrong key, or tampered)."""


def _derive(material: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return base64.urlsafe_b64encode(hkdf.derive(material))


def load_or_create_key_file(path: Path) -> bytes:
    """
    The raw key material in ``path``, creating it (32 random bytes, mode 0600) if absent.

    Creation uses ``O_CREAT | O_EXCL``, so two processes starting together never
    write two different keys: the loser reads the winner's file.

    Raises:
        OSError: the file cannot be read or created.
        ValueError: the file exists but is empty or truncated.
    """
    # The folder is created private too: it is the data folder of the embedded default.
    datadir.ensure_private_dir(path.parent, tighten=False)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        material = path.read_bytes()
        if len(material) < 32:
            raise ValueError(f"{path} holds {len(material)} bytes; expected 32") from None
        return material
    material = os.urandom(32)
    with os.fdopen(fd, "wb") as handle:
        handle.write(material)
        handle.flush()
        os.fsync(handle.fileno())
    _log.warning("secret_key_generated", path=str(path))
    return material


class SecretBox:
    """
    Seals and opens short secrets with one Fernet key.

    Args:
        material: key material; the Fernet key is HKDF-SHA256 of it.
    """

    def __init__(self, material: bytes) -> None:
        from cryptography.fernet import Fernet

        if not material:
            raise ValueError("secret key material is empty")
        self._fernet: Fernet = Fernet(_derive(material))

    @classmethod
    def from_settings(cls, settings: Settings) -> "SecretBox":
        """
        The box for this deployment: ``settings.secret_key``, else the key file in
        ``settings.data_dir`` (created on first use). Blocking file I/O: call it once,
        at start-up or through ``asyncio.to_thread``.
        """
        if settings.secret_key is not None and settings.secret_key.get_secret_value():
            return cls(settings.secret_key.get_secret_value().encode())
        return cls(load_or_create_key_file(Path(settings.data_dir) / KEY_FILE))

    def seal(self, plaintext: str) -> str:
        """The ciphertext of ``plaintext``, as ASCII text for a ``TEXT`` column."""
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def open(self, ciphertext: str) -> str:
        """
        The plaintext sealed in ``ciphertext``.

        Raises:
            SecretDecryptError: another key sealed it, or it was altered.
        """
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(ciphertext.encode("ascii")).decode()
        except (InvalidToken, UnicodeError) as exc:
            raise SecretDecryptError("stored secret does not decrypt with this key") from exc
