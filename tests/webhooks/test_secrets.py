"""Encryption at rest (delivery.secrets): the key file, the settings key, tampering."""

import base64
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


def test_recorded_answers_are_sealed_apart_and_never_share_a_nonce(tmp_path: Path) -> None:
    """
    ``seal_answer`` (AES-GCM) opens only with ``open_answer`` under the same key;
    a tampered, truncated or foreign one is refused; no two seals share a nonce.
    """
    ours = SecretBox.from_settings(Settings(data_dir=tmp_path, secret_key=SecretStr("one")))
    other = SecretBox.from_settings(Settings(data_dir=tmp_path, secret_key=SecretStr("two")))
    answer = b'{"accepted":true,"event_id":"evt_1"}'
    sealed = [ours.seal_answer(answer) for _ in range(1000)]
    assert all("evt_1" not in s for s in sealed)
    assert {ours.open_answer(s) for s in sealed} == {answer}
    nonces = [base64.urlsafe_b64decode(s)[:12] for s in sealed]
    assert len(set(nonces)) == len(nonces)
    # Another process's box (same key) draws its own nonce prefix.
    again = SecretBox.from_settings(Settings(data_dir=tmp_path, secret_key=SecretStr("one")))
    assert base64.urlsafe_b64decode(again.seal_answer(answer))[:8] != nonces[0][:8]
    assert again.open_answer(sealed[0]) == answer
    flipped = bytearray(base64.urlsafe_b64decode(sealed[0]))
    flipped[-1] ^= 1
    for bad in (
        base64.urlsafe_b64encode(bytes(flipped)).decode(),
        sealed[0][:10],
        "not base64 at all!",
    ):
        with pytest.raises(SecretDecryptError):
            ours.open_answer(bad)
    with pytest.raises(SecretDecryptError):
        other.open_answer(sealed[0])
    # The answers' key is not the secrets' key: neither opens the other's.
    with pytest.raises(SecretDecryptError):
        ours.open(sealed[0])
    with pytest.raises(SecretDecryptError):
        ours.open_answer(ours.seal("x"))
