"""Seeing what the relay does: log outputs (stdout, rotated files, CloudWatch Logs), the
Prometheus metrics it counts and what /metrics answers, and the health endpoint.

Observing must never stall the data path: log sinks do not block, counters are plain
increments, and what /metrics reads from PostgreSQL and Redis is cached. Nothing here
decides anything about a message.
"""
