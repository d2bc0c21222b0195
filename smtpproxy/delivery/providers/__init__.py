"""Provider types by name, and building a provider from its spec.

A provider's module (and what it needs: the HTTP client, the Graph token client, ...) is
imported when a provider of that type is first used, not when this package is: the CLI
and the tests that never deliver do not pay for every provider's imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from smtpproxy.delivery.providers.base import (
    Delivery,
    Paced,
    Provider,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
)

# every type's name, which is also the name of its module in this package
_NAMES = ("file", "sendgrid", "ses", "mailgun", "msgraph", "postmark", "smtp")


class _Types(Mapping[str, ProviderType]):
    """The provider types by name; a type's module is imported on first lookup."""

    def __getitem__(self, name: str) -> ProviderType:
        if name not in _NAMES:
            raise KeyError(name)
        ptype: ProviderType = importlib.import_module(f"{__name__}.{name}").TYPE
        return ptype

    def __contains__(self, name: object) -> bool:
        return name in _NAMES  # Mapping's own would import the module

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)


TYPES: Mapping[str, ProviderType] = _Types()

__all__ = [
    "TYPES",
    "Delivery",
    "Paced",
    "Provider",
    "ProviderConfigError",
    "ProviderSpec",
    "ProviderType",
    "build",
    "provider_type",
]


def provider_type(name: str) -> ProviderType:
    try:
        return TYPES[name]
    except KeyError:
        known = ", ".join(sorted(TYPES))
        raise ProviderConfigError(f"unknown provider type {name!r} (known: {known})") from None


def build(spec: ProviderSpec) -> Provider:
    """A ready provider for spec; ProviderConfigError when its settings are unusable."""
    ptype = provider_type(spec.type)
    ptype.validate(spec)
    return ptype.factory(spec)
