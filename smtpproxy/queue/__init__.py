"""The Redis side of the queue: one stream per tenant with its consumer group, the
liveness registry that says which consumers are alive, and the stream entries of the
original system (legacy.py).

Redis holds only message ids and who is working on them; PostgreSQL is the source of
truth, and anything lost here is rebuilt from it (the reconciler, fsck-storage).
"""
