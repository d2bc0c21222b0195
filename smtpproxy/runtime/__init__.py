"""Running the relay: `smtpproxy run`'s service tree, its supervisor and backoff, the
worker processes of `run.processes`, the resources they share (database pool, Redis,
message store, thread slots), the threads blocking libraries run in, hot reload,
embedded PostgreSQL and Redis, and the C library and heap calls Python lacks.

This package starts, stops and connects things; it holds no mail-handling decisions
(those live in ingress/, delivery/ and the pure modules they use).
"""
