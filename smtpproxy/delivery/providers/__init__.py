"""Provider types by name, and building a provider from its spec."""

from __future__ import annotations

from smtpproxy.delivery.providers import file, mailgun, msgraph, postmark, sendgrid, ses, smtp
from smtpproxy.delivery.providers.base import (
    Delivery,
    Paced,
    Provider,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
)

TYPES: dict[str, ProviderType] = {
    t.name: t
    for t in (
        file.TYPE,
        sendgrid.TYPE,
        ses.TYPE,
        mailgun.TYPE,
        msgraph.TYPE,
        postmark.TYPE,
        smtp.TYPE,
    )
}

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
