"""The gate every SMTP session passes: connection counts (total and per address), the
queue-depth backpressure switch and the drain switch at shutdown.

One Gate per ingress thread. Its fields are plain ints and bools, each written by one
side only (the protocol thread or trio), so neither side takes a lock to read them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from smtpproxy.observe.metrics import Metrics

if TYPE_CHECKING:
    from smtpproxy.ingress.protocol import RelaySMTP


class Gate:
    """Counters and switches shared by every session of one ingress thread (and read by
    trio: plain ints and bools, each written by one side only)."""

    def __init__(
        self,
        max_connections: int,
        max_per_ip: int = 0,
        max_session_duration: float = 0.0,
        max_queue_depth: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics or Metrics()
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip
        self.max_session_duration = max_session_duration
        self.max_queue_depth = max_queue_depth
        self.sessions = 0
        self.ended = 0  # sessions over since start
        self.per_ip: dict[str, int] = {}
        self.in_data = 0
        self.draining = False
        self.backlog = 0  # messages waiting for delivery, refreshed by trio
        self.protocols: set[RelaySMTP] = set()  # live sessions, closed at shutdown

    @property
    def overloaded(self) -> bool:
        return bool(self.max_queue_depth) and self.backlog > self.max_queue_depth
