"""delivery/pacing.py against real Redis: per-mailbox minute slots, the day's recipients,
holds after a 429, and one busy mailbox never slowing another."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from smtpproxy.delivery.pacing import PACED, TRAVEL, Admission, Pace, Pacer, waiting_reason

A = Pace(key="graph:t:a@contoso.example", label="a@contoso.example")
B = Pace(key="graph:t:b@contoso.example", label="b@contoso.example")


@pytest.fixture
def pacer(redis_url: str, key_prefix: str) -> Iterator[Pacer]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"{key_prefix}-pacing"
    yield Pacer(client, prefix)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


def windows_hold(times: list[float], limit: int, width: float = 60.0) -> bool:
    """No `width`-second window holds more than `limit` of these times."""
    times = sorted(times)
    return all(sum(1 for t in times if start - width < t <= start) <= limit for start in times)


def test_200_from_one_mailbox_and_20_from_another(pacer: Pacer) -> None:
    """200 messages from A and 20 from B at once: A's first 30 go, each of the rest gets
    its own slot so that no minute carries more than 30, and coming back at its slot it
    goes; B's 20 all go at once."""
    now = 1_000_000.0
    first = [pacer.admit(A, f"a{n}", 1, now=now) for n in range(200)]
    b = [pacer.admit(B, f"b{n}", 1, now=now) for n in range(20)]
    assert all(x.allowed for x in b)
    assert [x.allowed for x in first] == [True] * 30 + [False] * 170
    assert {x.limit for x in first[30:]} == {"minute"}
    sends = [now] * 30 + [now + x.wait for x in first[30:]]
    assert windows_hold(sends, 30, 60 + TRAVEL)
    assert max(sends) - now == pytest.approx(60 * (200 // 30), abs=61)
    # each comes back at its slot and is let through, without a new slot
    for n, x in enumerate(first[30:], start=30):
        again = pacer.admit(A, f"a{n}", 1, now=now + x.wait)
        assert again.allowed, (n, again)
    early = pacer.admit(A, "a199", 1, now=now + first[199].wait - 10)
    assert not early.allowed and early.wait == pytest.approx(10, abs=0.01)


def test_slots_follow_sends_that_age_out(pacer: Pacer) -> None:
    """A minute's sends leave the window a minute later, plus TRAVEL: Exchange counts a
    message when it arrives, and one request can travel longer than the next."""
    now = 2_000_000.0
    for n in range(30):
        assert pacer.admit(A, f"m{n}", 1, now=now).allowed
    late = pacer.admit(A, "late", 1, now=now + 58)
    assert not late.allowed and late.wait == pytest.approx(2 + TRAVEL, abs=0.01)
    assert pacer.admit(A, "later", 1, now=now + 60 + TRAVEL + 0.1).allowed


def test_a_message_back_just_before_its_slot_goes_at_its_slot(pacer: Pacer) -> None:
    """Coming back a little early (the scheduler's granularity), a message is let through
    without another round through PostgreSQL, but told to wait for its slot: never
    sent before it."""
    now = 2_500_000.0
    for n in range(30):
        assert pacer.admit(A, f"m{n}", 1, now=now).allowed
    reserved = pacer.admit(A, "next", 1, now=now + 1)
    slot = now + 1 + reserved.wait
    back = pacer.admit(A, "next", 1, now=slot - 0.3)
    assert back.allowed and back.wait == pytest.approx(0.3, abs=0.01)
    on_time = pacer.admit(A, "next", 1, now=slot + 0.2)
    assert on_time.allowed and on_time.wait == 0


def test_recipients_per_day(pacer: Pacer) -> None:
    """The day's recipients: a message that would pass the limit waits until enough of
    the day's recipients have left the 24-hour window."""
    pace = Pace(
        key="graph:t:bulk", label="bulk@contoso.example", per_minute=1000, recipients_per_day=100
    )
    now = 3_000_000.0
    assert pacer.admit(pace, "m1", 60, now=now).allowed
    assert pacer.admit(pace, "m2", 30, now=now + 3600).allowed
    refused = pacer.admit(pace, "m3", 20, now=now + 7200)
    assert (refused.allowed, refused.limit) == (False, "day")
    assert refused.wait == pytest.approx(86400 - 7200, abs=1)
    assert pacer.admit(pace, "m3", 20, now=now + 86400 + 1).allowed


def test_a_hold_stops_one_mailbox(pacer: Pacer) -> None:
    pacer.hold(A, 2.5)
    held = pacer.admit(A, "x", 1)
    assert (held.allowed, held.limit) == (False, "hold") and 2 < held.wait <= 2.5
    assert pacer.admit(B, "y", 1).allowed


def test_the_reason_names_the_mailbox_and_the_limit() -> None:
    reason = waiting_reason(A, Admission(False, 30, "minute"))
    assert reason.startswith(PACED) and "a@contoso.example" in reason and "30" in reason
