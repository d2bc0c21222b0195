"""Metrics in the Prometheus text exposition format (version 0.0.4), served at /metrics.

Counters and histograms are updated where things happen (the ingress thread, the
delivery tasks); gauges are read when the endpoint is scraped. Every label takes values
from a small fixed set (SMTP commands and reply codes, provider names the operator
configured, message statuses): never a message id, an address or an error text.

A lock guards each family: the ingress thread and trio both write, and a scrape reads
from trio.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import attrs

LabelValues = tuple[str, ...]

# seconds; DATA-to-250 is a few milliseconds when healthy, seconds when a dependency stalls
INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# provider API calls take tens of milliseconds to seconds, up to their timeout
DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


@attrs.define
class Family:
    """One metric name: its help text, type and label names."""

    name: str
    doc: str
    kind: str  # counter | gauge | histogram
    labelnames: tuple[str, ...] = ()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"]


class Counter:
    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()) -> None:
        self.family = Family(name, doc, "counter", tuple(labelnames))
        self._values: dict[LabelValues, float] = {}
        self._lock = threading.Lock()
        if not labelnames:
            self._values[()] = 0.0

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        names = self.family.labelnames
        total = self.family.name + "_total"
        return self.family.header() + [
            f"{total}{_labels(names, labels)} {format_value(v)}" for labels, v in items
        ]


class Histogram:
    def __init__(
        self, name: str, doc: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> None:
        self.family = Family(name, doc, "histogram", tuple(labelnames))
        self.bounds = tuple(sorted(buckets))
        self._series: dict[LabelValues, list[float]] = {}  # bucket counts..., count, sum
        self._lock = threading.Lock()
        if not labelnames:
            self._series[()] = [0.0] * (len(self.bounds) + 2)

    def observe(self, seconds: float, *labels: str) -> None:
        n = len(self.bounds)
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [0.0] * (n + 2)
            for i in range(n):  # not cumulative here; summed when rendered
                if seconds <= self.bounds[i]:
                    series[i] += 1
                    break
            series[n] += 1
            series[n + 1] += seconds

    def count(self, *labels: str) -> int:
        with self._lock:
            series = self._series.get(labels)
            return int(series[len(self.bounds)]) if series else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        f = self.family
        n = len(self.bounds)
        out = f.header()
        for labels, series in items:
            running = 0.0
            for bound, hits in zip(self.bounds, series, strict=False):
                running += hits
                le = f'le="{float(bound)!r}"'  # 1.0, as the reference client writes it
                out.append(
                    f"{f.name}_bucket{_labels(f.labelnames, labels, le)} {format_value(running)}"
                )
            inf = 'le="+Inf"'
            out.append(
                f"{f.name}_bucket{_labels(f.labelnames, labels, inf)} {format_value(series[n])}"
            )
            out.append(f"{f.name}_count{_labels(f.labelnames, labels)} {format_value(series[n])}")
            out.append(f"{f.name}_sum{_labels(f.labelnames, labels)} {format_value(series[n + 1])}")
        return out


def gauge(
    name: str, doc: str, values: Mapping[LabelValues, float], labelnames: Sequence[str] = ()
) -> list[str]:
    """A gauge read at scrape time: {label values: value}."""
    family = Family(name, doc, "gauge", tuple(labelnames))
    return family.header() + [
        f"{name}{_labels(family.labelnames, labels)} {format_value(v)}"
        for labels, v in sorted(values.items())
    ]


def sample(name: str, doc: str, value: float, kind: str = "gauge") -> list[str]:
    """A single unlabelled series; a counter's name gets `_total`."""
    family = Family(name, doc, kind)
    series = name + "_total" if kind == "counter" else name
    return [*family.header(), f"{series} {format_value(value)}"]


class Metrics:
    """What smtpproxy counts while it runs: one instance per `serve()`."""

    def __init__(self) -> None:
        self.started = time.time()
        self.smtp_sessions = Counter(
            "smtpproxy_smtp_sessions", "SMTP connections accepted by the listeners."
        )
        self.smtp_device_sessions = Counter(
            "smtpproxy_smtp_device_sessions",
            "SMTP sessions that sent as a registered device without AUTH, by device name.",
            ("device",),
        )
        self.smtp_replies = Counter(
            "smtpproxy_smtp_replies",
            "SMTP replies sent, by the command answered (CONNECT for the greeting or a "
            "refusal, OTHER for unknown commands) and reply code. DATA 250 is a message "
            "accepted; 4xx/5xx at MAIL, RCPT or DATA are rejections.",
            ("command", "code"),
        )
        self.messages_accepted = Counter(
            "smtpproxy_messages_accepted", "Messages made durable and answered 250."
        )
        self.bytes_accepted = Counter(
            "smtpproxy_message_bytes_accepted", "Bytes of message data accepted."
        )
        self.ingest_seconds = Histogram(
            "smtpproxy_ingest_seconds",
            "From the client's end-of-data dot to the reply (storage, PostgreSQL, Redis).",
            INGEST_BUCKETS,
        )
        self.deliveries = Counter(
            "smtpproxy_deliveries",
            "Delivery attempts, by tenant id, provider and what the attempt led to "
            "(delivered, retrying, failed, dlq, failover, ...).",
            ("tenant", "provider", "outcome"),
        )
        self.delivery_seconds = Histogram(
            "smtpproxy_delivery_seconds",
            "Duration of provider API calls, by tenant id and provider.",
            DELIVERY_BUCKETS,
            ("tenant", "provider"),
        )

    def reply(self, command: str, status: str) -> None:
        code = status[:3]
        if len(code) == 3 and code.isdigit():
            self.smtp_replies.inc(command, code)

    def rendered_events(self) -> list[str]:
        out: list[str] = []
        for metric in (
            self.smtp_sessions,
            self.smtp_device_sessions,
            self.smtp_replies,
            self.messages_accepted,
            self.bytes_accepted,
            self.ingest_seconds,
            self.deliveries,
            self.delivery_seconds,
        ):
            out += metric.render()
        return out


def process_metrics(started: float) -> list[str]:
    """The standard process_* series (what client libraries export), from /proc."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = sample(
        "process_cpu_seconds",
        "User and system CPU time spent, in seconds.",
        usage.ru_utime + usage.ru_stime,
        "counter",
    )
    out += sample("process_start_time_seconds", "Start time since the epoch.", started)
    rss, vms = _memory()
    out += sample("process_resident_memory_bytes", "Resident memory size in bytes.", rss)
    out += sample("process_virtual_memory_bytes", "Virtual memory size in bytes.", vms)
    fds = _open_fds()
    if fds is not None:
        out += sample("process_open_fds", "Open file descriptors.", fds)
    out += sample(
        "process_max_fds",
        "Maximum open file descriptors.",
        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    )
    out += sample("process_threads", "Operating system threads.", threading.active_count())
    return out


def _memory() -> tuple[float, float]:
    try:
        size, resident = (int(x) for x in Path("/proc/self/statm").read_text().split()[:2])
    except OSError:  # not Linux: peak RSS is the best there is
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return float(peak), 0.0
    page = os.sysconf("SC_PAGE_SIZE")
    return float(resident * page), float(size * page)


def _open_fds() -> int | None:
    try:
        return sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:
        return None


def render(chunks: Iterable[list[str]]) -> bytes:
    lines: list[str] = []
    for chunk in chunks:
        lines += chunk
    return ("\n".join(lines) + "\n").encode()


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# series the processes of one instance do not add up: the first process's value stands
NOT_ADDED = frozenset({"process_start_time_seconds", "process_max_fds"})


def _parse(text: str) -> dict[str, tuple[list[str], dict[str, float]]]:
    """Families of an exposition: name -> (HELP and TYPE lines, series -> value)."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    current: tuple[list[str], dict[str, float]] = ([], {})
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = families.setdefault(line.split(" ", 3)[2], ([], {}))
            current[0].append(line)
        elif line.startswith("# TYPE "):
            current[0].append(line)
        elif line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            current[1][series] = float(value)
    return families


def merge(first: str, others: Iterable[str]) -> str:
    """One exposition for several processes of one instance: every series present in
    any of them, with the values added up (counters, histogram buckets, open sessions,
    memory); families only the first has (the queue gauges read from PostgreSQL and
    Redis) stay as they are, and NOT_ADDED series keep the first process's value."""
    merged = _parse(first)
    for text in others:
        for name, (header, series) in _parse(text).items():
            if name not in merged:
                merged[name] = (header, dict(series))
                continue
            values = merged[name][1]
            for key, value in series.items():
                if key in values and key.split("{", 1)[0] in NOT_ADDED:
                    continue
                values[key] = values.get(key, 0.0) + value
    lines: list[str] = []
    for header, series in merged.values():
        lines += header
        lines += [f"{key} {format_value(value)}" for key, value in series.items()]
    return "\n".join(lines) + "\n"
