"""Pure decisions of ingress admission: AUTH failure tracking, network allowlists and
address syntax."""

from __future__ import annotations

import pytest

from smtpproxy.ingress.limits import FailureTracker, ip_allowed
from smtpproxy.mail.domains import is_qualified_mailbox


def tracker() -> FailureTracker:
    return FailureTracker(max_failures=3, window=900, base_delay=0.5, max_delay=8)


def test_failures_slow_down_then_lock_the_address_and_the_username() -> None:
    t = tracker()
    delays = [t.failed("192.0.2.1", "app", now) for now in (0, 1, 2)]
    assert delays == [0.5, 1.0, 2.0]
    assert t.locked("192.0.2.1", "app", 3)
    assert t.locked("192.0.2.1", "other", 3)  # the address is locked for every username
    assert t.locked("198.51.100.7", "app", 3)  # so is the username from a new address
    assert not t.locked("198.51.100.7", "other", 3)
    assert not t.locked("192.0.2.1", "app", 903)  # the window passed


def test_a_locked_username_still_works_from_an_address_it_logged_in_from() -> None:
    """Someone failing logins under a real client's username from elsewhere must not lock
    that client out: its address logged in successfully, so it is trusted for a day."""
    t = tracker()
    t.succeeded("192.0.2.1", "app", 0)
    for now in (10, 11, 12):
        t.failed("203.0.113.9", "app", now)  # an attacker
    assert t.locked("203.0.113.9", "app", 13)
    assert t.locked("198.51.100.7", "app", 13)  # a new address is still refused
    assert not t.locked("192.0.2.1", "app", 13)  # the real client carries on
    for now in (20, 21, 22):
        t.failed("192.0.2.1", "app", now)  # the trusted address's own failures count
    assert t.locked("192.0.2.1", "other", 23) and t.locked("192.0.2.1", "app", 23)
    for now in (90_000, 90_001, 90_002):
        t.failed("203.0.113.9", "app", now)
    assert t.locked("192.0.2.1", "app", 90_003)  # trust lasts trust_period (a day)


def test_prune_forgets_old_failures_and_old_trust() -> None:
    t = tracker()
    t.failed("192.0.2.1", "app", 0)
    t.succeeded("192.0.2.2", "app", 0)
    t.prune(100_000)
    assert t._by_key == {}
    assert t._trusted == {}


def test_ip_allowed() -> None:
    assert ip_allowed("192.0.2.1", [])
    assert ip_allowed("192.0.2.1", ["192.0.2.0/24"])
    assert ip_allowed("::ffff:192.0.2.1", ["192.0.2.0/24"])  # IPv4-mapped
    assert not ip_allowed("198.51.100.1", ["192.0.2.0/24", "2001:db8::/32"])
    assert ip_allowed("2001:db8::5", ["192.0.2.0/24", "2001:db8::/32"])
    assert not ip_allowed("not an address", ["192.0.2.0/24"])


@pytest.mark.parametrize(
    "address",
    [
        "bob@example.org",
        "first.last+tag@sub.example.co.uk",
        '"bob smith"@example.org',
        "bøb@exämple.org",
        "a@[192.0.2.1]",
        "a@[IPv6:2001:db8::1]",
        "a@example.org.",
    ],
)
def test_qualified_mailboxes(address: str) -> None:
    assert is_qualified_mailbox(address)


@pytest.mark.parametrize(
    "address",
    ["bob", "bob@localhost", "@example.org", "bob@", "a b@example.org", "a@-x.org", "a@x..org"],
)
def test_unqualified_addresses(address: str) -> None:
    assert not is_qualified_mailbox(address)


def test_reserve_counts_checks_in_progress() -> None:
    """Failures counted plus checks in progress stay under the limit: one more waits,
    a settled success frees its place, counted failures lock."""
    t = tracker()
    now = 1000.0
    assert [t.reserve("1.2.3.4", "app", now) for _ in range(4)] == [
        "ok",
        "ok",
        "ok",
        "wait",
    ]
    t.settle("1.2.3.4", "app")  # a success
    assert t.reserve("1.2.3.4", "app", now) == "ok"
    for _ in range(3):
        t.failed("1.2.3.4", "app", now)
        t.settle("1.2.3.4", "app")
    assert t.reserve("1.2.3.4", "app", now) == "locked"
    assert t.reserve("5.6.7.8", "other", now) == "ok"  # others are not held back
