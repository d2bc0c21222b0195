"""Running the `smtpproxy` CLI as a real process in tests, and checking its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Result = subprocess.CompletedProcess[str]
Cli = Callable[..., Result]  # `cli(*args, input=None)`: the command with a test's config

# variables a developer's terminal may set that would change Rich's output
TERMINAL_ENV = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def config_settings(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, secret_key: str
) -> dict[str, Any]:
    """The settings of an administrative CLI test's config file."""
    return {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": pg_url},
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "security": {"secret_key": secret_key},
    }


def cli_env() -> dict[str, str]:
    """This process's environment for a child `smtpproxy`: without SMTPPROXY_CONFIG, and
    without the terminal's variables, so Rich renders as for an 80-column pipe (what a
    script or CI job reading the output sees, wherever the tests run)."""
    env = {k: v for k, v in os.environ.items() if k != "SMTPPROXY_CONFIG"}
    for name in TERMINAL_ENV:
        env.pop(name, None)
    return env


def command(config: Path | None, *args: str) -> list[str]:
    """The argv of `smtpproxy [--config CONFIG] ARGS...` run by this Python."""
    options = ["--config", str(config)] if config is not None else []
    return [sys.executable, "-m", "smtpproxy", *options, *args]


def run_cli(
    config: Path | None,
    *args: str,
    input: str | None = None,  # noqa: A002
    timeout: float = 60,
    check: bool = False,
) -> Result:
    """`smtpproxy --config CONFIG ARGS...` as a child process in the config's directory
    (without --config, in this one); stdin is `input` or empty. check: raise
    CalledProcessError when it exits non-zero."""
    return subprocess.run(
        command(config, *args),
        capture_output=True,
        text=True,
        input=input or "",
        timeout=timeout,
        env=cli_env(),
        cwd=config.parent if config is not None else None,
        check=check,
    )


def ok(result: Result) -> str:
    """stdout of a command that must have succeeded."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def as_json(result: Result) -> Any:
    return json.loads(ok(result))


def fails(result: Result, *fragments: str, code: int = 1, stdout: bool = False) -> str:
    """Check a clean failure: the exit code, nothing on stdout (unless stdout: a command
    that shows what it found before failing), no traceback, and stderr that is exactly
    one `error:` line (exit 1) or only `config error:` lines (exit 2) naming every
    fragment. Returns stderr."""
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    if not stdout:
        assert result.stdout == ""
    lines = result.stderr.splitlines()
    if code == 1:
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: "), lines
    else:
        assert lines, "no config error on stderr"
        assert all(line.startswith("config error: ") for line in lines), lines
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"
    return result.stderr
