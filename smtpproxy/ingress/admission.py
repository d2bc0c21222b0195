"""Admission at SMTP time: refuse a message its route's provider could never take.

The routing snapshot (the same one the consumers use) says which provider will carry
each recipient; a provider type declares the largest raw message it accepts (a
provider's own `max_message_bytes` setting can lower it). A message over that size is
refused with 552 5.3.4 at RCPT (when the client declared SIZE=) or after DATA, instead
of being accepted and failing later. Recipient counts need no check: larger groups are
split into several requests at delivery. Pure; reads an immutable snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable

from smtpproxy.delivery import providers, routing
from smtpproxy.delivery.directory import Snapshot
from smtpproxy.models import AccountIdentity


def provider_size_limit(
    snapshot: Snapshot, account: AccountIdentity, mail_from: str, rcpt: str
) -> tuple[int | None, str]:
    """(largest message the recipient's provider takes or None, that provider's name)."""
    groups, _ = routing.route(
        snapshot.rules_for(account.tenant_id),
        account_id=account.account_id,
        mail_from=mail_from,
        recipients=[rcpt],
        default_route=snapshot.default_route,
    )
    if not groups:
        return None, ""
    name = groups[0].provider
    spec = snapshot.spec(account.tenant_id, name)
    ptype = providers.TYPES.get(spec.type) if spec is not None else None
    if spec is None or ptype is None:
        return None, name
    return ptype.message_limit(spec), name


def too_big_for(
    snapshot: Snapshot, account: AccountIdentity, mail_from: str, rcpts: Iterable[str], size: int
) -> str | None:
    """The first provider (by recipient order) the message is too big for, or None."""
    for rcpt in rcpts:
        limit, name = provider_size_limit(snapshot, account, mail_from, rcpt)
        if limit is not None and size > limit:
            return name
    return None


def declared_size(options: Iterable[str]) -> int | None:
    """The SIZE= value a client declared in MAIL FROM, if any."""
    for opt in options:
        key, _, value = opt.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None
