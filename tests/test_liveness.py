"""The liveness registry of delivery consumers (queue/liveness.py) against real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from smtpproxy.queue.liveness import ConsumerRegistry, heartbeat_timing


@pytest.fixture
def registry(redis_url: str, key_prefix: str) -> Iterator[ConsumerRegistry]:
    client = redis.Redis.from_url(redis_url)
    yield ConsumerRegistry(client, key_prefix)
    client.delete(f"{key_prefix}:consumers", f"{key_prefix}:consumers:since")
    client.close()


def test_beats_expire_and_leaving_is_immediate(registry: ConsumerRegistry) -> None:
    assert registry.beat("a", 0.3).names == {"a"}
    assert registry.beat("b", 60).names == {"a", "b"}
    time.sleep(0.4)
    assert registry.beat("b", 60).names == {"b"}  # a missed its beat
    registry.leave("b")
    assert registry.beat("c", 60).names == {"c"}


def test_a_new_registry_is_incomplete_for_one_lifetime(registry: ConsumerRegistry) -> None:
    """Right after Redis lost the registry, live consumers have not all beaten again:
    nobody's absence proves anything until one heartbeat lifetime has passed."""
    assert not registry.beat("a", 0.3).complete
    time.sleep(0.35)
    assert registry.beat("a", 0.3).complete
    registry.client.delete(registry.key, registry.since_key)  # Redis restarted empty
    assert not registry.beat("a", 0.3).complete


def test_others_leaves_out_the_asker(registry: ConsumerRegistry) -> None:
    registry.beat("a", 60)
    assert registry.beat("b", 60).others("b") == ["a"]


@pytest.mark.parametrize(
    ("visibility", "interval", "lifetime"),
    [(300, 10, 150), (3, 0.5, 1.5), (0.5, 0.2, 0.6)],
)
def test_heartbeat_timing(visibility: float, interval: float, lifetime: float) -> None:
    assert heartbeat_timing(visibility) == pytest.approx((interval, lifetime))
