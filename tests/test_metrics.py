"""The Prometheus text format, checked with the reference parser (prometheus_client)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from smtpproxy.observe import metrics, scrape
from smtpproxy.observe.metrics import Counter, Histogram, Metrics


def parse(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}"""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_counter_with_labels_and_escaping() -> None:
    c = Counter("demo_replies", "Replies.", ("command", "code"))
    c.inc("MAIL", "250")
    c.inc("MAIL", "250")
    c.inc('odd"\\\n', "550")
    parsed = parse(metrics.render([c.render()]))["demo_replies_total"]
    assert parsed[(("code", "250"), ("command", "MAIL"))] == 2
    assert parsed[(("code", "550"), ("command", 'odd"\\\n'))] == 1


def test_unlabelled_counter_starts_at_zero() -> None:
    parsed = parse(metrics.render([Counter("demo_sessions", "Sessions.").render()]))
    assert parsed["demo_sessions_total"] == {(): 0}


def test_histogram_buckets_are_cumulative_with_count_and_sum() -> None:
    h = Histogram("demo_seconds", "Latency.", (0.01, 0.1, 1.0), ("provider",))
    for seconds in (0.005, 0.05, 0.05, 0.5, 7.0):
        h.observe(seconds, "ses")
    h.observe(0.01, "graph")  # a bound is inclusive (le)
    parsed = parse(metrics.render([h.render()]))
    buckets = parsed["demo_seconds_bucket"]
    assert [
        buckets[(("le", le), ("provider", "ses"))] for le in ("0.01", "0.1", "1.0", "+Inf")
    ] == [
        1,
        3,
        4,
        5,
    ]
    assert buckets[(("le", "0.01"), ("provider", "graph"))] == 1
    assert parsed["demo_seconds_count"][(("provider", "ses"),)] == 5
    assert abs(parsed["demo_seconds_sum"][(("provider", "ses"),)] - 7.605) < 1e-9


def test_event_metrics_and_process_metrics_parse() -> None:
    m = Metrics()
    m.reply("DATA", "250 2.0.0 Ok: queued as x")
    m.reply("RCPT", "550 5.1.1 no")
    m.reply("RCPT", "garbage")  # not a reply code: not counted
    m.ingest_seconds.observe(0.004)
    m.deliveries.inc("7", "outbox", "delivered")
    m.delivery_seconds.observe(0.2, "7", "outbox")
    parsed = parse(metrics.render([m.rendered_events(), metrics.process_metrics(m.started)]))
    assert parsed["smtpproxy_smtp_replies_total"] == {
        (("code", "250"), ("command", "DATA")): 1,
        (("code", "550"), ("command", "RCPT")): 1,
    }
    assert parsed["smtpproxy_ingest_seconds_count"] == {(): 1}
    assert parsed["smtpproxy_deliveries_total"] == {
        (("outcome", "delivered"), ("provider", "outbox"), ("tenant", "7")): 1
    }
    assert parsed["process_resident_memory_bytes"][()] > 10_000_000
    assert parsed["process_cpu_seconds_total"][()] > 0
    assert parsed["process_open_fds"][()] >= 3


def test_message_gauges_fill_every_status_and_take_the_oldest_waiting() -> None:
    rows = [
        {"status": "queued", "n": 3, "oldest_s": 12.5},
        {"status": "retrying", "n": 1, "oldest_s": 400.0},
        {"status": "dlq", "n": 9, "oldest_s": 90000.0},  # dead letters are not "waiting"
    ]
    parsed = parse(metrics.render([scrape.message_gauges(rows)]))
    assert parsed["smtpproxy_messages"] == {
        (("status", "queued"),): 3,
        (("status", "retrying"),): 1,
        (("status", "sending"),): 0,
        (("status", "dlq"),): 9,
        (("status", "failed"),): 0,
        (("status", "storage_error"),): 0,
    }
    assert parsed["smtpproxy_queue_oldest_age_seconds"] == {(): 400.0}


def test_merge_adds_up_the_processes_of_one_instance() -> None:
    """run.processes: counters, histogram buckets and process gauges are added up, a
    series only one process has is kept, the start time is the first process's, and
    families only the first renders (queue gauges) are left as they are."""
    first_sessions = Counter("demo_sessions", "Sessions.", ("outcome",))
    other_sessions = Counter("demo_sessions", "Sessions.", ("outcome",))
    first_sessions.inc("ok", amount=3)
    other_sessions.inc("ok", amount=4)
    other_sessions.inc("refused")
    first_latency = Histogram("demo_seconds", "Latency.", (0.1, 1.0))
    other_latency = Histogram("demo_seconds", "Latency.", (0.1, 1.0))
    first_latency.observe(0.05)
    other_latency.observe(0.5)
    queue = metrics.sample("demo_queue", "Waiting (read from PostgreSQL).", 9)
    first = metrics.render(
        [
            queue,
            first_sessions.render(),
            first_latency.render(),
            metrics.sample("process_start_time_seconds", "Start.", 100),
            metrics.sample("process_resident_memory_bytes", "RSS.", 1000),
        ]
    )
    other = metrics.render(
        [
            other_sessions.render(),
            other_latency.render(),
            metrics.sample("process_start_time_seconds", "Start.", 200),
            metrics.sample("process_resident_memory_bytes", "RSS.", 500),
        ]
    )
    merged = parse(metrics.merge(first.decode(), [other.decode()]).encode())
    assert merged["demo_sessions_total"] == {(("outcome", "ok"),): 7, (("outcome", "refused"),): 1}
    buckets = merged["demo_seconds_bucket"]
    assert [buckets[(("le", le),)] for le in ("0.1", "1.0", "+Inf")] == [1, 2, 2]
    assert merged["demo_seconds_count"] == {(): 2}
    assert merged["demo_queue"] == {(): 9}
    assert merged["process_start_time_seconds"] == {(): 100}
    assert merged["process_resident_memory_bytes"] == {(): 1500}
