"""What GET /metrics answers: the counters kept while serving, plus gauges read now.

The queue gauges come from PostgreSQL (messages per status, oldest waiting) and Redis
(stream entries, pending, unread, dead-letter stream). They are cached for a few
seconds so that several scrapers cannot load either server; when one does not answer,
its gauges are left out and `smtpproxy_scrape_ok{source=...}` says 0.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from psycopg.rows import dict_row

from smtpproxy.db.pool import Conn
from smtpproxy.db.queries import Q
from smtpproxy.delivery.breaker import ProviderHealth
from smtpproxy.ingress.gate import Gate
from smtpproxy.models import DEAD, LIVE, values
from smtpproxy.observe import logsetup, metrics
from smtpproxy.runtime.resources import Resources

CACHE_SECONDS = 5.0
STATUSES = values(LIVE | DEAD)
CIRCUIT_STATES = ("closed", "open", "half-open")


def message_gauges(rows: list[dict[str, Any]]) -> list[str]:
    counts: dict[tuple[str, ...], float] = {(s,): 0.0 for s in STATUSES}
    oldest = 0.0
    for r in rows:
        counts[(str(r["status"]),)] = float(r["n"])
        if r["status"] in LIVE and r["oldest_s"] is not None:
            oldest = max(oldest, float(r["oldest_s"]))
    return metrics.gauge(
        "smtpproxy_messages",
        "Messages by status: waiting for delivery (queued, retrying, sending) or "
        "dead-lettered (dlq, failed, storage_error).",
        counts,
        ("status",),
    ) + metrics.sample(
        "smtpproxy_queue_oldest_age_seconds",
        "Age of the oldest message waiting for delivery (0 when none is).",
        oldest,
    )


def stream_gauges(res: Resources) -> list[str]:
    b = res.streams.backlog()
    return (
        metrics.sample(
            "smtpproxy_queue_stream_entries",
            "Entries on the delivery streams (every tenant).",
            b.entries,
        )
        + metrics.sample(
            "smtpproxy_queue_pending_entries",
            "Entries a consumer has read and not finished.",
            b.pending,
        )
        + metrics.sample(
            "smtpproxy_consumer_lag_entries",
            "Entries on the delivery streams no consumer has read yet.",
            b.unread,
        )
        + metrics.sample(
            "smtpproxy_dlq_stream_entries",
            "Entries on the dead-letter stream.",
            b.dead_letters,
        )
    )


def gate_gauges(gate: Gate) -> list[str]:
    return (
        metrics.sample("smtpproxy_smtp_sessions_active", "Open SMTP sessions.", gate.sessions)
        + metrics.sample(
            "smtpproxy_smtp_data_in_progress", "SMTP sessions receiving DATA now.", gate.in_data
        )
        + metrics.sample(
            "smtpproxy_smtp_backpressure",
            "1 while the delivery backlog is over smtp.max_queue_depth (new mail gets 421).",
            1 if gate.overloaded else 0,
        )
    )


def circuit_gauges(health: ProviderHealth) -> list[str]:
    values: dict[tuple[str, ...], float] = {}
    for key, state in health.snapshot().items():
        tenant, _, provider = key.partition("/")
        tenant = "" if tenant == "None" else tenant
        for s in CIRCUIT_STATES:
            values[(provider, tenant, s)] = 1.0 if state["circuit"] == s else 0.0
    return metrics.gauge(
        "smtpproxy_provider_circuit",
        "Circuit breaker state per provider (tenant is empty for a shared provider).",
        values,
        ("provider", "tenant", "state"),
    )


def cloudwatch_counters() -> list[str]:
    stats = logsetup.cloudwatch_statistics()
    if stats is None:
        return []
    return (
        metrics.sample(
            "smtpproxy_cloudwatch_events_sent",
            "Log events CloudWatch accepted.",
            stats.sent,
            "counter",
        )
        + metrics.sample(
            "smtpproxy_cloudwatch_events_dropped",
            "Log events dropped locally (buffer full, or unsent at stop).",
            stats.dropped,
            "counter",
        )
        + metrics.sample(
            "smtpproxy_cloudwatch_events_rejected",
            "Log events CloudWatch refused.",
            stats.rejected,
            "counter",
        )
        + metrics.sample(
            "smtpproxy_cloudwatch_put_failures",
            "PutLogEvents calls that failed.",
            stats.failed,
            "counter",
        )
        + metrics.sample(
            "smtpproxy_cloudwatch_events_buffered",
            "Log events waiting to be sent.",
            stats.buffered,
        )
    )


def _read_messages(conn: Conn) -> list[dict[str, Any]]:
    conn.execute("SET LOCAL statement_timeout = 2000")  # a scrape must not queue up
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(Q.metrics_messages).fetchall())


@attrs.define
class Scraper:
    res: Resources
    gate: Gate | None = None
    health: ProviderHealth | None = None
    # the other processes' /metrics/process texts (run.processes > 1)
    others: Callable[[], Awaitable[list[str]]] | None = None
    _cache: tuple[float, list[str]] | None = attrs.field(default=None, init=False)
    _lock: trio.Lock = attrs.Factory(trio.Lock)

    async def _queue(self) -> list[str]:
        async with self._lock:  # one scrape at a time reads the servers
            now = time.monotonic()
            if self._cache is not None and now - self._cache[0] < CACHE_SECONDS:
                return self._cache[1]
            lines: list[str] = []
            ok: dict[tuple[str, ...], float] = {}
            try:
                rows = await self.res.db.run(_read_messages)
                lines += message_gauges(rows)
                ok[("postgresql",)] = 1
            except Exception:  # noqa: BLE001 - a scrape reports, it does not fail
                ok[("postgresql",)] = 0
            try:
                lines += await self.res.redis_offload(stream_gauges, self.res)
                ok[("redis",)] = 1
            except Exception:  # noqa: BLE001
                ok[("redis",)] = 0
            lines += metrics.gauge(
                "smtpproxy_scrape_ok",
                "1 when the queue gauges from this source were read on the last scrape.",
                ok,
                ("source",),
            )
            self._cache = (now, lines)
            return lines

    async def render(self) -> bytes:
        """GET /metrics: this process's metrics, the queue gauges, and with several
        processes the other processes' own metrics added in."""
        chunks = [
            metrics.sample("smtpproxy_up", "1 while smtpproxy is serving.", 1),
            await self._queue(),
            *self._local(),
        ]
        if self.others is None:
            return metrics.render(chunks)
        others = await self.others()
        chunks.append(
            metrics.sample(
                "smtpproxy_processes",
                "Processes serving (run.processes + run.delivery_processes).",
                1 + len(others),
            )
        )
        return metrics.merge(metrics.render(chunks).decode(), others).encode()

    async def render_local(self) -> bytes:
        """GET /metrics/process: what this process counts itself (no queue gauges)."""
        return metrics.render(self._local())

    def _local(self) -> list[list[str]]:
        m = self.res.metrics
        chunks = [m.rendered_events()]
        if self.gate is not None:
            chunks.append(gate_gauges(self.gate))
        if self.health is not None:
            chunks.append(circuit_gauges(self.health))
        return [*chunks, cloudwatch_counters(), metrics.process_metrics(m.started)]
