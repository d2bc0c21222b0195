"""The liveness registry of delivery consumers (queue/liveness.py) against real Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from smtpproxy.config import ConfigError, structure
from smtpproxy.queue.liveness import ConsumerRegistry
from smtpproxy.queue.streams import Streams


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


def test_heartbeat_lifetime_must_cover_three_beats() -> None:
    with pytest.raises(ConfigError, match=r"delivery\.heartbeat_lifetime"):
        structure({"delivery": {"heartbeat_interval": "2s", "heartbeat_lifetime": "5s"}})
    cfg = structure({})
    assert (cfg.delivery.heartbeat_interval, cfg.delivery.heartbeat_lifetime) == (2, 10)


@pytest.fixture
def streams(redis_url: str, key_prefix: str) -> Iterator[Streams]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    s = Streams(client, f"{key_prefix}-takeover")
    yield s
    for key in client.scan_iter(f"{key_prefix}-takeover*"):
        client.delete(key)
    client.close()


def test_take_over_claims_only_silent_consumers_that_are_not_alive(streams: Streams) -> None:
    """A dead consumer's pending entries move to the taker once it has been silent for
    the given idle time, and the dead consumer is then forgotten; a live consumer's
    entries, and a silent consumer still in the live list, are left alone."""
    stream = streams.stream_for(1)
    streams.ensure_groups([stream])
    streams.add_many([{"id": f"m{n}", "tenant_id": "1", "account_id": "1"} for n in range(6)])
    assert len(streams.read("dead", [stream], 2, 100)) == 2
    assert len(streams.read("alive", [stream], 2, 100)) == 2
    assert len(streams.read("asleep", [stream], 2, 100)) == 2
    alive = frozenset({"alive", "asleep", "taker"})
    assert streams.take_over("taker", [stream], alive - {"asleep"}, 60_000, 10) == []
    time.sleep(0.25)
    streams.read("alive", [stream], 1, 1)  # heard from: not silent
    taken = streams.take_over("taker", [stream], alive, 200, 10)
    assert sorted(e.fields["id"] for e in taken) == ["m0", "m1"]
    assert streams.pending(stream).consumers == {"taker": 2, "alive": 2, "asleep": 2}
    streams.finish(taken)
    time.sleep(0.25)
    assert streams.take_over("taker", [stream], alive, 200, 10) == []
    names = {c["name"] for c in streams.client.xinfo_consumers(stream, "delivery")}
    assert "dead" not in names and {"alive", "asleep", "taker"} <= names
