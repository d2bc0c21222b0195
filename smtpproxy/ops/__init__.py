"""What operators run besides the relay: the storage consistency checker
(`fsck-storage`, and its periodic run inside `smtpproxy run`), the reports behind
`logs`, `stats`, `message show` and `queue status`, the dead-letter operations, and the
pure parts of `send-test`.

The CLI calls these and only prints; these read and write PostgreSQL, Redis and the
message store themselves and never print.
"""
