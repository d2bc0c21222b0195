"""The exception tree of smtpproxy.

Library errors (psycopg, redis-py, boto3, httpx, OSError) are converted to these at the
adapter that calls the library, so the rest of the code catches only what is drawn here::

    SmtpProxyError
    ├── ConfigError            bad or missing configuration; names the key path (exit 2)
    ├── ListenError            a listener cannot bind (address in use, permission)
    ├── UsageError             a CLI user asked for something impossible (exit 1)
    │   ├── NotFoundError      no such tenant / account / provider / route
    │   └── ConflictError      duplicate name, or a change that would break an invariant
    ├── UnavailableError       a dependency did not answer; retry later (SMTP 451)
    │   ├── DatabaseUnavailable
    │   ├── QueueUnavailable
    │   └── StoreUnavailable
    ├── StoreError             the message store refused an operation
    │   └── BodyNotFound       a key that is not in the store (every backend raises this one)
    └── SecretError            a provider secret cannot be decrypted with the configured key

Nothing here carries a secret in its message: callers pass names and ids, never values.
"""

from __future__ import annotations


class SmtpProxyError(Exception):
    """Base of every error smtpproxy raises on purpose."""


class ConfigError(SmtpProxyError):
    """Configuration is invalid; the message starts with the key path."""


class ListenError(SmtpProxyError):
    """A configured listener could not bind its address."""


class UsageError(SmtpProxyError):
    """A CLI request that cannot be carried out as asked."""


class NotFoundError(UsageError):
    """The named object does not exist."""


class ConflictError(UsageError):
    """The request conflicts with existing data or an invariant."""


class UnavailableError(SmtpProxyError):
    """A dependency is unreachable or failed transiently."""


class DatabaseUnavailable(UnavailableError):
    """PostgreSQL did not answer."""


class QueueUnavailable(UnavailableError):
    """Redis did not answer."""


class StoreUnavailable(UnavailableError):
    """The message store did not answer or refused a write (disk full, read-only, S3 error)."""


class StoreError(SmtpProxyError):
    """The message store refused an operation."""


class BodyNotFound(StoreError, KeyError):
    """The key is not in the message store."""

    def __str__(self) -> str:
        return f"no body stored under {self.args[0]!r}" if self.args else "body not found"


class SecretError(SmtpProxyError):
    """A stored secret cannot be decrypted (wrong or missing secret key)."""
