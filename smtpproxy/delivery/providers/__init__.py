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

# type name -> the module (in this package) whose TYPE it is
_MODULES = {
    "file": "file",
    "sendgrid": "sendgrid",
    "ses": "ses",
    "mailgun": "mailgun",
    "msgraph": "msgraph",
    "postmark": "postmark",
    "smtp": "smtp",
}


class _Types(Mapping[str, ProviderType]):
    """The provider types by name; a type's module is imported on first lookup."""

    def __getitem__(self, name: str) -> ProviderType:
        module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        ptype: ProviderType = module.TYPE
        return ptype

    def __contains__(self, name: object) -> bool:
        return name in _MODULES  # Mapping's own would import the module

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


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
