"""Encryption at rest (delivery.secrets): the key file, the settings key, tampering."""

import stat
from pathlib import Path

import pytest
from pydantic import SecretStr

from delivery.secrets import KEY_FILE, SecretBox, SecretDecryptError
from delivery.settings import Settings


def test_generated_key_file_is_private_and_reused(tmp_path: Path) -> None:
    """Without DELIVERY_SECRET_KEY a 0600 key file is created once and then reused."""
    settings = Settings(data_dir=tmp_path / "data")
    first = SecretBox.from_settings(settings)
    path = tmp_path / "data" / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    sealed = first.seal("whsec_abc")
    assert "whsec_abc" not in sealed
    assert SecretBox.from_settings(settings).open(sealed) == "whsec_abc"


def test_settings_key_wins_and_a_foreign_key_cannot_open(tmp_path: Path) -> None:
    """DELIVERY_SECRET_KEY is used when set; another key's ciphertext is refused."""
    ours = SecretBox.from_settings(Settings(data_dir=tmp_path, secret_key=SecretStr("one")))
    other = SecretBox.from_settings(Settings(data_dir=tmp_path, secret_key=SecretStr("two")))
    assert not (tmp_path / KEY_FILE).exists()
    sealed = ours.seal("Bearer token")
    with pytest.raises(SecretDecryptError):
        other.open(sealed)
    with pytest.raises(SecretDecryptError):
        ours.open(sealed[:-4] + "AAAA")


def test_a_truncated_key_file_is_an_error(tmp_path: Path) -> None:
    """A damaged key file fails loudly instead of silently making a new key."""
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(ValueError, match="expected 32"):
        SecretBox.from_settings(Settings(data_dir=tmp_path))
