"""Routing: which provider carries which recipients. Pure functions over a snapshot.

Rules belong to a tenant and are tried by ascending priority (then id); the first rule
whose conditions all hold for a recipient decides that recipient's provider. Conditions:
sender domain glob, recipient domain glob, account. A rule without conditions is a
catch-all. When no rule matches, the configured default route (if any) applies.
Recipients that end up with different providers form separate groups, and the message
is split so each group is delivered (and retried) on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from smtpproxy.mail.domains import domain_matches, domain_of


@attrs.frozen
class Rule:
    id: int
    tenant_id: int
    priority: int
    provider: str
    sender_domain: str | None = None
    recipient_domain: str | None = None
    account_id: int | None = None
    fallbacks: tuple[str, ...] = ()
    enabled: bool = True

    def matches(self, account_id: int, sender_domain: str, recipient_domain: str) -> bool:
        if not self.enabled:
            return False
        if self.account_id is not None and self.account_id != account_id:
            return False
        if self.sender_domain is not None and not domain_matches(self.sender_domain, sender_domain):
            return False
        return self.recipient_domain is None or domain_matches(
            self.recipient_domain, recipient_domain
        )


@attrs.frozen
class RouteGroup:
    provider: str
    recipients: tuple[str, ...]
    fallbacks: tuple[str, ...] = ()
    rule_id: int | None = None  # None: the default route


def sort_rules(rules: Iterable[Rule]) -> list[Rule]:
    return sorted(rules, key=lambda r: (r.priority, r.id))


def route(
    rules: Sequence[Rule],
    *,
    account_id: int,
    mail_from: str,
    recipients: Sequence[str],
    default_route: str = "",
) -> tuple[list[RouteGroup], list[str]]:
    """Group recipients by provider. Returns (groups, unrouted recipients).

    rules must be one tenant's rules in evaluation order (see sort_rules).
    """
    sender = domain_of(mail_from)
    chosen: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    first_rule: dict[tuple[str, tuple[str, ...]], int | None] = {}
    unrouted: list[str] = []
    for rcpt in recipients:
        rdomain = domain_of(rcpt)
        rule = next((r for r in rules if r.matches(account_id, sender, rdomain)), None)
        if rule is not None:
            key, rule_id = (rule.provider, rule.fallbacks), rule.id
        elif default_route:
            key, rule_id = (default_route, ()), None
        else:
            unrouted.append(rcpt)
            continue
        chosen.setdefault(key, []).append(rcpt)
        first_rule.setdefault(key, rule_id)
    groups = [
        RouteGroup(provider, tuple(rcpts), fallbacks, first_rule[(provider, fallbacks)])
        for (provider, fallbacks), rcpts in chosen.items()
    ]
    return groups, unrouted
