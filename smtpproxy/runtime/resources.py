"""Opening and closing what the service and the CLI share: the database pool, Redis,
the message store, the secret box, and the thread slots each blocking library uses."""

from __future__ import annotations

import attrs
from redis import Redis

from smtpproxy.config import Config
from smtpproxy.config.crypto import SecretBox
from smtpproxy.db.pool import Database
from smtpproxy.observe.metrics import Metrics
from smtpproxy.queue.streams import Streams, connect
from smtpproxy.runtime import embedded
from smtpproxy.runtime.threads import Offload
from smtpproxy.store import MessageStore, open_store


@attrs.define
class Resources:
    cfg: Config
    db: Database
    redis: Redis
    blocking_redis: Redis  # for XREADGROUP BLOCK: its own pool and a longer timeout
    streams: Streams
    redis_offload: Offload
    store: MessageStore
    store_offload: Offload
    box: SecretBox
    cpu_offload: Offload  # password hashing
    metrics: Metrics = attrs.Factory(Metrics)  # counted while serving, read by /metrics

    def consumer_streams(self) -> Streams:
        return Streams(self.blocking_redis, self.cfg.redis.key_prefix)

    def close(self) -> None:
        self.db.close()
        self.store.close()
        self.redis.close()
        self.blocking_redis.close()


def open_resources(cfg: Config, *, application_name: str = "smtpproxy") -> Resources:
    db = Database(
        embedded.database_url(cfg),
        min_size=cfg.database.pool_min,
        max_size=cfg.database.pool_max,
        connect_timeout=cfg.database.connect_timeout,
        name=application_name,
    )
    db.open()
    rurl = embedded.redis_url(cfg)
    client = connect(rurl, socket_timeout=cfg.redis.socket_timeout)
    blocking = connect(rurl, socket_timeout=cfg.redis.socket_timeout + 5)
    return Resources(
        cfg=cfg,
        db=db,
        redis=client,
        blocking_redis=blocking,
        streams=Streams(client, cfg.redis.key_prefix),
        redis_offload=Offload("redis", 16),
        store=open_store(cfg),
        store_offload=Offload("store", 32),
        box=SecretBox.from_config(cfg),
        cpu_offload=Offload("cpu", 2),
    )
