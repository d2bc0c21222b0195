"""Delivery: consumers that read message ids from the Redis Streams, claim the rows in
PostgreSQL, route each message, call its provider and record every attempt.

Owns routing (the directory snapshot and the rules), the provider types and their HTTP
client, retry and dead-letter decisions, circuit breakers, per-mailbox pacing, and the
recorder that commits outcomes in batches. It acknowledges a stream entry only after
its outcome is committed, and never sends a message whose claim it does not hold.
"""
