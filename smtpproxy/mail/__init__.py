"""Mail as data: domain names and globs, and the header summary kept in PostgreSQL.

Pure functions on addresses, domains and header blocks, shared by ingress, routing and
the operator commands. No I/O, no sockets, no database: anything here can be tested
with plain values.
"""
