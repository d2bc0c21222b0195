"""Encryption of provider secrets at rest (Fernet: AES-128-CBC + HMAC-SHA256).

The key comes from `security.secret_key` or from the key file (`security.secret_key_file`,
default <data_dir>/secret.key), which is created with mode 0600 the first time any
smtpproxy process needs it. Plain secrets exist only in memory, never in PostgreSQL,
logs or output.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from smtpproxy.config import Config
from smtpproxy.errors import ConfigError, SecretError


class SecretBox:
    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError:
            raise ConfigError(
                "security.secret_key: expected a urlsafe-base64 32-byte key "
                "(make one with: smtpproxy gen-secret-key)"
            ) from None

    @classmethod
    def from_config(cls, cfg: Config) -> SecretBox:
        if cfg.security.secret_key:
            return cls(cfg.security.secret_key.encode())
        return cls(load_or_create_key(cfg.secret_key_file))

    def encrypt(self, plain: str) -> bytes:
        return self._fernet.encrypt(plain.encode("utf-8"))

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode("utf-8")
        except InvalidToken:
            raise SecretError(
                "a stored provider secret cannot be decrypted with the configured "
                "secret key (was security.secret_key or the key file changed?)"
            ) from None


def load_or_create_key(path: Path) -> bytes:
    """Read the key file, creating it (0600, exclusive) when it does not exist."""
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key(path)  # another process created it first
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return key


def _read_key(path: Path) -> bytes:
    try:
        data = path.read_bytes().strip()
    except PermissionError:
        raise ConfigError(f"security.secret_key_file: cannot read {path}") from None
    if not data:
        raise ConfigError(f"security.secret_key_file: {path} is empty")
    return data


def generate_key() -> str:
    return Fernet.generate_key().decode()
