# smtpproxy: every routine task. `just --list` shows them.

set positional-arguments

# start the relay (embedded PostgreSQL/Redis unless smtpproxy.toml says otherwise)
run *args:
    uv run smtpproxy "$@" run

# the whole test suite (real PostgreSQL/Redis from SMTPPROXY_TEST_* or embedded ones) on
# one worker per CPU (pytest-xdist; each its own database and Redis key prefix), the
# slowest 25 tests listed at the end (docs/development.md)
test *args:
    uv run pytest -q -n auto --dist worksteal --durations=25 "$@"

# the unit tier only: no database, Redis, service or process (about a minute)
test-fast *args:
    uv run pytest -q -m unit "$@"

# ruff (lint + format check) and mypy --strict on the package
lint:
    uv run ruff check smtpproxy tests
    uv run ruff format --check smtpproxy tests
    uv run mypy

# format the code
fmt:
    uv run ruff format smtpproxy tests
    uv run ruff check --fix smtpproxy tests

# ingest benchmark: 50 sessions x 10 KB messages against a fresh instance
bench *args:
    uv run python -m tests.bench.ingest "$@"

# relay benchmark: accept and deliver through a provider API, against Postfix relaying
# (issue 12's figures; see tests/bench/relay.py for the options)
bench-relay *args:
    uv run python -m tests.bench.relay "$@"

# Microsoft 365 pacing in real time: 200 + 20 messages from two mailboxes to the Graph
# test server, no 429, at most 30 a minute per mailbox (tests/bench/m365.py)
bench-m365 *args:
    uv run python -m tests.bench.m365 "$@"

# every ingest figure docs/performance.md quotes, one after another (about 25 minutes: each run
# that writes files waits 5 minutes after the previous one deleted its own, see
# tests/bench/targets.py; run it on an otherwise idle machine; the Postfix runs need the
# postfix package and root)
bench-report:
    uv run python -m tests.bench.ingest --at-rest
    uv run python -m tests.bench.ingest --at-rest --target postfix
    uv run python -m tests.bench.ingest --at-rest --target postfix --generator smtp-source
    uv run python -m tests.bench.ingest --at-rest --rate 750 --messages 15000
    uv run python -m tests.bench.ingest --at-rest --new-connection --tls --messages 4000
    uv run python -m tests.bench.ingest --idle 1000
    uv run python -m tests.bench.ingest --idle 1000 --tls

# serve docs/ with mkdocs-material at http://127.0.0.1:8000 (the pages also read as they are)
docs *args:
    uvx --with mkdocs-material mkdocs serve "$@"

# regenerate docs/reference/ (CLI and provider settings) from the code
docs-gen:
    uv run python -m tests.docs.gen

# what CI runs
ci:
    .ci/run
