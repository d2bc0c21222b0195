"""CloudWatch Logs output: a sink that never blocks, and one sender thread.

The sink side (``CloudWatchSink.append``) runs in whatever thread logs (the ingress
asyncio thread, trio, worker threads): it only puts the formatted line into a bounded
in-memory buffer. When the buffer is full the oldest line is dropped and counted, so a
slow or unreachable CloudWatch costs memory up to the bound and nothing else.

A daemon thread (not trio: it must keep working while trio is busy or gone) sends what
is buffered with PutLogEvents every ``flush_interval`` seconds, or sooner when a full
batch is waiting. Each batch respects the documented PutLogEvents constraints
(CloudWatch Logs API reference, PutLogEvents):

- at most 10,000 events;
- at most 1,048,576 bytes, counted as each message's UTF-8 size plus 26 bytes;
- events in chronological order by timestamp;
- a batch spans less than 24 hours;
- each event at most 256 KB (longer messages are truncated here, and say so).

A missing log group or stream (ResourceNotFoundException) is created, then the batch is
sent again. Other failures keep the batch and retry it after an exponential backoff (1 s
up to 30 s); the client makes a single attempt per call (no SDK retries, so no retry
storm against an endpoint that is down). A batch CloudWatch refuses as invalid is
discarded and counted as rejected. ``stop()`` sends what it can within a short deadline
and never waits longer than that.

Credentials come from the standard AWS chain (environment, shared files, instance or
task role); the region from ``log.cw_region`` or that chain.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import attrs
import boto3
import botocore.config
import botocore.exceptions
from loguru import logger

if TYPE_CHECKING:
    from mypy_boto3_logs.client import CloudWatchLogsClient
    from mypy_boto3_logs.type_defs import InputLogEventTypeDef

MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD = 26
MAX_EVENT_BYTES = 256 * 1024  # the message plus its 26 bytes of overhead stays within this
MAX_SPAN_MS = 24 * 3600 * 1000
TRUNCATED = " ...[truncated by smtpproxy: {} bytes cut]"

# CloudWatch will never accept these batches as they are: sending them again is pointless
_DISCARD = frozenset(
    {"InvalidParameterException", "DataAlreadyAcceptedException", "InvalidSequenceTokenException"}
)
_BACKOFF_FIRST = 1.0
_BACKOFF_MAX = 30.0
_TAKE_CHUNK = 500  # events moved out of the buffer per lock acquisition


class Event(NamedTuple):
    timestamp: int  # milliseconds since the epoch
    message: str
    size: int  # UTF-8 bytes of message + EVENT_OVERHEAD


@attrs.frozen
class CloudWatchStats:
    """Counters since the sink started (for metrics)."""

    sent: int  # events CloudWatch accepted
    dropped: int  # events lost locally: buffer full, or still unsent at stop()
    failed: int  # PutLogEvents calls that failed (each batch is retried or discarded)
    rejected: int  # events CloudWatch refused (too old, too new, invalid batch)
    batches: int  # successful PutLogEvents calls
    buffered: int  # events waiting in memory right now


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def make_event(timestamp_ms: int, message: str) -> Event:
    """An event for message, truncated to CloudWatch's event size limit if needed."""
    if not message:
        message = " "  # CloudWatch rejects empty messages
    size = _utf8_size(message)
    limit = MAX_EVENT_BYTES - EVENT_OVERHEAD
    if size > limit:
        raw = message.encode("utf-8")
        marker_room = len(TRUNCATED.format(size)) + 2
        kept = raw[: limit - marker_room].decode("utf-8", errors="ignore")
        message = kept + TRUNCATED.format(size - _utf8_size(kept))
        size = _utf8_size(message)
    return Event(timestamp_ms, message, size + EVENT_OVERHEAD)


def make_client(region: str, endpoint: str) -> CloudWatchLogsClient:
    """One CloudWatch Logs client: standard credential chain, explicit timeouts, no
    SDK retries (the sender thread backs off itself)."""
    session = boto3.session.Session(region_name=region or None)
    return session.client(
        "logs",
        endpoint_url=endpoint or None,
        config=botocore.config.Config(
            connect_timeout=3,
            read_timeout=10,
            retries={"mode": "standard", "max_attempts": 1},
            max_pool_connections=2,
        ),
    )


def _error_code(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _reason(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"


class CloudWatchSink:
    """Buffer log lines and send them to one CloudWatch Logs stream from a daemon thread.

    ``append()`` is the only method logging threads call; ``start()`` and ``stop()``
    belong to whoever configures logging.
    """

    def __init__(
        self,
        client: CloudWatchLogsClient,
        group: str,
        stream: str,
        *,
        max_events: int = 50_000,
        max_bytes: int = 32 * 1024 * 1024,
        flush_interval: float = 1.0,
        stop_timeout: float = 3.0,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.client = client
        self.group = group
        self.stream = stream
        self.max_events = max_events
        self.max_bytes = max(max_bytes, MAX_EVENT_BYTES)
        self.flush_interval = flush_interval
        self.stop_timeout = stop_timeout
        self._buffer: collections.deque[Event] = collections.deque(maxlen=max_events)
        self._buffered_bytes = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self._failing = False
        self._sent = self._dropped = self._failed = self._rejected = self._batches = 0

    # -- logging threads ---------------------------------------------------------------

    def append(self, timestamp_ms: int, message: str) -> None:
        """Buffer one line; drop (and count) the oldest when the buffer is full."""
        event = make_event(timestamp_ms, message)
        with self._lock:
            buf = self._buffer
            before_len, before_bytes = len(buf), self._buffered_bytes
            while buf and (
                len(buf) >= self.max_events or self._buffered_bytes + event.size > self.max_bytes
            ):
                self._buffered_bytes -= buf.popleft().size
                self._dropped += 1
            buf.append(event)
            self._buffered_bytes += event.size
            after_len, after_bytes = len(buf), self._buffered_bytes
        batch_events = min(MAX_BATCH_EVENTS, self.max_events)
        if before_len < batch_events <= after_len or before_bytes < MAX_BATCH_BYTES <= after_bytes:
            self._wake.set()  # a full batch is waiting: no need to wait for the timer

    def take_batch(self) -> list[Event]:
        """Move the longest prefix of the buffer that makes one valid PutLogEvents batch
        out of it, in chronological order. Holds the lock only briefly at a time."""
        batch: list[Event] = []
        total = 0
        lo = hi = 0
        buf = self._buffer
        full = False
        while not full:
            with self._lock:
                for _ in range(_TAKE_CHUNK):
                    if not buf or len(batch) >= MAX_BATCH_EVENTS:
                        full = True
                        break
                    ev = buf[0]
                    new_lo = min(lo, ev.timestamp) if batch else ev.timestamp
                    new_hi = max(hi, ev.timestamp) if batch else ev.timestamp
                    if batch and (
                        total + ev.size > MAX_BATCH_BYTES or new_hi - new_lo >= MAX_SPAN_MS
                    ):
                        full = True
                        break
                    buf.popleft()
                    self._buffered_bytes -= ev.size
                    batch.append(ev)
                    total += ev.size
                    lo, hi = new_lo, new_hi
        batch.sort(key=lambda e: e.timestamp)  # stable: equal timestamps keep their order
        return batch

    def statistics(self) -> CloudWatchStats:
        return CloudWatchStats(
            sent=self._sent,
            dropped=self._dropped,
            failed=self._failed,
            rejected=self._rejected,
            batches=self._batches,
            buffered=len(self._buffer),
        )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cloudwatch-logs", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Send what is buffered within timeout (default stop_timeout), then stop.
        Returns within the timeout even when CloudWatch does not answer."""
        thread = self._thread
        if thread is None:
            return
        wait = self.stop_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + wait
        self._stopping.set()
        self._wake.set()
        thread.join(wait + 0.5)
        if not thread.is_alive():
            self._thread = None
            self.client.close()

    # -- sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        batch: list[Event] = []
        backoff = 0.0
        next_send = time.monotonic() + self.flush_interval
        while not self._stopping.is_set():
            self._wake.wait(max(0.0, next_send - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                break
            now = time.monotonic()
            if backoff and now < next_send:
                continue  # woken by a full buffer while backing off: keep backing off
            batch, ok = self._drain(batch, deadline=None)
            if ok:
                backoff = 0.0
                next_send = time.monotonic() + self.flush_interval
            else:
                backoff = min(_BACKOFF_MAX, backoff * 2) if backoff else _BACKOFF_FIRST
                next_send = time.monotonic() + backoff
        self._final_flush(batch)

    def _drain(self, batch: list[Event], deadline: float | None) -> tuple[list[Event], bool]:
        """Send batch, then everything buffered; on failure return the unsent batch."""
        while deadline is None or time.monotonic() < deadline:
            if not batch:
                batch = self.take_batch()
                if not batch:
                    return [], True
            if not self._send(batch):
                return batch, False
            batch = []
            if deadline is None and self._stopping.is_set():
                break  # the final flush takes over, within its deadline
        return batch, True

    def _final_flush(self, batch: list[Event]) -> None:
        batch, _ = self._drain(batch, deadline=self._deadline)
        with self._lock:
            lost = len(batch) + len(self._buffer)
            self._buffer.clear()
            self._buffered_bytes = 0
            self._dropped += lost

    def _send(self, batch: list[Event]) -> bool:
        """One PutLogEvents (creating the group and stream if missing). True when the
        batch is done with (sent, or discarded as invalid), False to retry it later."""
        try:
            try:
                response = self._put(batch)
            except botocore.exceptions.ClientError as exc:
                if _error_code(exc) != "ResourceNotFoundException":
                    raise
                self._create_group_and_stream()
                response = self._put(batch)
        except Exception as exc:  # noqa: BLE001 - the sender thread must outlive any failure
            self._failed += 1
            if _error_code(exc) in _DISCARD:
                self._rejected += len(batch)
                logger.bind(cloudwatch_group=self.group).error(
                    "CloudWatch Logs refused a batch of {} events ({})", len(batch), _reason(exc)
                )
                return True
            if not self._failing:
                self._failing = True
                logger.bind(cloudwatch_group=self.group).warning(
                    "CloudWatch Logs unavailable ({}); buffering up to {} events, then "
                    "dropping the oldest",
                    _reason(exc),
                    self.max_events,
                )
            return False
        rejected = _rejected_count(response.get("rejectedLogEventsInfo"), len(batch))
        self._rejected += rejected
        self._sent += len(batch) - rejected
        self._batches += 1
        if self._failing:
            self._failing = False
            logger.bind(cloudwatch_group=self.group).info("CloudWatch Logs reachable again")
        return True

    def _put(self, batch: list[Event]) -> Any:
        events: list[InputLogEventTypeDef] = [
            {"timestamp": e.timestamp, "message": e.message} for e in batch
        ]
        return self.client.put_log_events(
            logGroupName=self.group, logStreamName=self.stream, logEvents=events
        )

    def _create_group_and_stream(self) -> None:
        exists = self.client.exceptions.ResourceAlreadyExistsException
        with contextlib.suppress(exists):
            self.client.create_log_group(logGroupName=self.group)
        with contextlib.suppress(exists):
            self.client.create_log_stream(logGroupName=self.group, logStreamName=self.stream)


def _rejected_count(info: Any, n: int) -> int:
    """How many of n events rejectedLogEventsInfo says CloudWatch did not take."""
    if not info:
        return 0
    old_end = max(info.get("tooOldLogEventEndIndex", -1), info.get("expiredLogEventEndIndex", -1))
    new_start = info.get("tooNewLogEventStartIndex", n)
    return sum(1 for i in range(n) if i <= old_end or i >= new_start)
