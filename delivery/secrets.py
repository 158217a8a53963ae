"""
Encryption at rest for tenant secrets (webhook signing secrets, ``auth_header``):
a secret is never stored in clear.

Values are sealed with Fernet (AES-128-CBC + HMAC-SHA256, from ``cryptography``), so a
tampered or foreign ciphertext fails loudly instead of decrypting to garbage. The key:

- ``DELIVERY_SECRET_KEY`` when set: any text; the Fernet key is derived from it with
  HKDF-SHA256, so an operator can use a password-manager string. Every process of a
  deployment (web, handlers) must share it.
- otherwise ``<data_dir>/secret.key``: 32 random bytes, created once with mode 0600 on
  first use (the embedded default, where every part shares the data folder). Losing
  that file makes the stored secrets unreadable: back it up with the database.

Signing needs the secret itself (HMAC), so it is encrypted, not hashed.

Values that must also be found by equality (a contact's address, unique per user)
get a keyed digest beside the sealed value (:meth:`SecretBox.digest`, HMAC-SHA256
with a second key derived from the same material): a plain hash of a phone number
or an address is reversed by trying every candidate, a keyed one is not without
the key.
"""

import asyncio
import base64
import hashlib
import hmac
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
_DIGEST_INFO = b"sonzai-delivery lookup digests v1"
_log = structlog.get_logger(__name__)


class SecretDecryptError(Exception):
    """A stored value does not decrypt with this key (wrong key, or tampered)."""


def _hkdf(material: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


def _derive(material: bytes) -> bytes:
    return base64.urlsafe_b64encode(_hkdf(material, _HKDF_INFO))


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
    Seals and opens short secrets with one Fernet key, and digests lookup values.

    Args:
        material: key material; the Fernet key and the digest key are HKDF-SHA256 of
            it with different ``info``, so neither reveals the other.
    """

    def __init__(self, material: bytes) -> None:
        from cryptography.fernet import Fernet

        if not material:
            raise ValueError("secret key material is empty")
        self._fernet: Fernet = Fernet(_derive(material))
        self._digest_key = _hkdf(material, _DIGEST_INFO)

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

    @classmethod
    def for_migration(cls, settings: Settings) -> "SecretBox":
        """
        The box a migration seals stored values with: :meth:`from_settings`, except that
        on a configured database (``DELIVERY_DATABASE_URL``) without
        ``DELIVERY_SECRET_KEY`` an absent key file is not generated. There the other
        processes hold the key (a one-shot ``delivery migrate`` often runs with less
        configuration than they do), and a new key would seal what they cannot open.
        The embedded default keeps its key beside its database, so it may make one.

        Raises:
            RuntimeError: a configured database, no ``DELIVERY_SECRET_KEY`` and no key file.
        """
        has_key = settings.secret_key is not None and settings.secret_key.get_secret_value()
        path = Path(settings.data_dir) / KEY_FILE
        if settings.database_url and not has_key and not path.exists():
            raise RuntimeError(
                "DELIVERY_SECRET_KEY is not set and there is no "
                f"{path}: set DELIVERY_SECRET_KEY to the value the other processes use "
                "before migrating (a new key would seal data they cannot open)"
            )
        return cls.from_settings(settings)

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

    def digest(self, text: str) -> str:
        """
        The keyed digest of ``text`` (HMAC-SHA256, 64 hex characters): equal texts give
        equal digests under one key, so a unique index or an equality lookup can use it
        while the value itself stays sealed.
        """
        return hmac.new(self._digest_key, text.encode(), hashlib.sha256).hexdigest()


class LazySecretBox:
    """
    The deployment's :class:`SecretBox`, built on the first :meth:`get`, in a worker
    thread: building it reads (or creates) the key file and imports ``cryptography``,
    which a process that never opens a secret (no contacts, no webhooks) never pays.

    Args:
        settings: where the key comes from (:meth:`SecretBox.from_settings`).
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._box: SecretBox | None = None

    async def get(self) -> SecretBox:
        """The box; two first calls at once may both build it, and get the same key."""
        if self._box is None:
            self._box = await asyncio.to_thread(SecretBox.from_settings, self._settings)
        return self._box
