"""What every provider is: a spec (from PostgreSQL or the config file), a send() that
turns one delivery into an Outcome, and the registry of provider types.

Provider modules keep three parts apart: a pure request builder, a pure response
classifier, and a thin send() that does the I/O between them. A provider never raises
for a delivery problem: it returns Outcome.retry or Outcome.permanent. It raises
ProviderConfigError only when its settings make it unusable (a recorded failure).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from smtpproxy.errors import SmtpProxyError
from smtpproxy.models import Outcome

if TYPE_CHECKING:
    from smtpproxy.delivery.pacing import Pace


class ProviderConfigError(SmtpProxyError):
    """A provider's settings are missing or invalid; names the setting."""


@attrs.frozen
class ProviderSpec:
    name: str
    type: str
    settings: Mapping[str, Any] = attrs.Factory(dict)
    endpoint: str | None = None
    secret: str | None = attrs.field(default=None, repr=False)  # plain, in memory only
    tenant_id: int | None = None  # None: defined in the config file, for every tenant
    enabled: bool = True

    def setting(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def positive(self, key: str, default: float) -> float:
        """A setting that must be a positive number."""
        return self._positive(key, default, float)

    def positive_int(self, key: str, default: int) -> int:
        """A setting that must be a positive whole number."""
        return int(self._positive(key, default, int))

    def _positive(self, key: str, default: float, convert: Callable[[Any], float]) -> float:
        try:
            value = convert(self.settings.get(key, default))
        except (TypeError, ValueError):
            raise ProviderConfigError(
                f"provider {self.name}: setting {key!r} must be a number"
            ) from None
        if value <= 0:
            raise ProviderConfigError(f"provider {self.name}: setting {key!r} must be positive")
        return value

    def require(self, key: str) -> Any:
        value = self.settings.get(key)
        if value in (None, ""):
            raise ProviderConfigError(f"provider {self.name}: setting {key!r} is required")
        return value

    def require_secret(self, what: str) -> str:
        if not self.secret:
            raise ProviderConfigError(
                f"provider {self.name}: no {what} stored (add it with --secret-stdin)"
            )
        return self.secret


@attrs.frozen
class Delivery:
    """One attempt's input: the envelope of one route group and the exact bytes."""

    message_id: str
    tenant_id: int
    account_id: int
    mail_from: str
    recipients: tuple[str, ...]
    body: bytes = attrs.field(repr=False)


class Provider(Protocol):
    spec: ProviderSpec

    async def send(self, delivery: Delivery) -> Outcome: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Paced(Protocol):
    """A provider whose sending identities (mailboxes) have limits of their own: it
    names, per delivery, who sends it and at what pace (delivery/pacing.py)."""

    def pace(self, delivery: Delivery) -> Pace | None: ...


@attrs.frozen
class SettingInfo:
    description: str
    required: bool = False


# settings every provider type accepts, whatever its API
COMMON_SETTINGS: Mapping[str, SettingInfo] = {
    "max_message_bytes": SettingInfo(
        "refuse larger messages at SMTP time with 552 (bytes; can only lower the type's limit)"
    ),
}


@attrs.frozen
class ProviderType:
    name: str
    factory: Callable[[ProviderSpec], Provider]
    settings: Mapping[str, SettingInfo]
    secret: str | None = None  # what the secret is ("API key"), None if it takes none
    secret_required: bool = False
    default_endpoint: str | None = None
    max_recipients: int | None = None  # per request; larger route groups are split
    max_message_bytes: int | None = None  # largest raw message the provider can take
    max_connections: int = 20  # default of the max_connections setting: calls at once
    # the largest message as a provider's settings make it (replaces max_message_bytes)
    limit_for: Callable[[ProviderSpec], int | None] | None = None

    def message_limit(self, spec: ProviderSpec) -> int | None:
        """The largest message this provider takes: the type's limit (as its settings
        make it), lowered by the max_message_bytes setting."""
        base = self.limit_for(spec) if self.limit_for is not None else self.max_message_bytes
        own = spec.settings.get("max_message_bytes")
        limits = [v for v in (base, own) if isinstance(v, int) and v > 0]
        return min(limits) if limits else None

    def all_settings(self) -> Mapping[str, SettingInfo]:
        """This type's settings and the ones every provider takes."""
        return {**COMMON_SETTINGS, **self.settings}

    def validate(self, spec: ProviderSpec) -> None:
        """Raise ProviderConfigError for unknown or missing settings."""
        known_settings = self.all_settings()
        for key in spec.settings:
            if key not in known_settings:
                known = ", ".join(sorted(known_settings)) or "none"
                raise ProviderConfigError(
                    f"provider {spec.name}: type {self.name} has no setting {key!r} "
                    f"(known: {known})"
                )
        for key, info in self.settings.items():
            if info.required:
                spec.require(key)
        if self.secret_required:
            spec.require_secret(self.secret or "secret")
