"""SMTP ingress: aiosmtpd on its own uvloop thread, and the group commit on trio that
makes every accepted message durable before its 250.

Owns the SMTP dialogue (protocol, handler, the DATA reader, replies), who may send
(AUTH and its throttling, devices, allowed networks, rate limits and quotas, the
connection gate), and the commit (body to the store, row to PostgreSQL, id to the
stream, in batches). It must never answer 250 before all three are durable, never put
internal error text in a reply, and never call a provider: delivery starts from the
stream.
"""
