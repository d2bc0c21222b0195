"""SMTP account passwords: scrypt hashes (a memory-hard KDF from the standard library).

Stored form: ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``, so parameters can be
raised later without invalidating existing hashes. Verification is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

# n=2**14, r=8 needs 16 MiB and ~30-60 ms on one core: slow for guessing, fine for login
_LOG2_N, _R, _P = 14, 8, 1
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << _LOG2_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=32
    )
    return f"scrypt${_LOG2_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str | bytes, stored: str) -> bool:
    """True when password matches the stored hash; False for any malformed hash."""
    try:
        scheme, log2_n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        raw = password if isinstance(password, bytes) else password.encode("utf-8")
        got = hashlib.scrypt(
            raw,
            salt=_unb64(salt),
            n=1 << int(log2_n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def generate_password() -> str:
    """A strong random password (~144 bits) that survives copy and paste."""
    return secrets.token_urlsafe(18)
