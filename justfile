# smtpproxy: every routine task. `just --list` shows them.

set positional-arguments

# start the relay (embedded PostgreSQL/Redis unless smtpproxy.toml says otherwise)
run *args:
    uv run smtpproxy "$@" run

# the test suite (real PostgreSQL/Redis from SMTPPROXY_TEST_* or embedded ones)
test *args:
    uv run pytest -q "$@"

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

# what CI runs
ci:
    .ci/run
