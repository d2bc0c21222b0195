"""Running the `smtpproxy` CLI as a real process in tests, and checking its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

Result = subprocess.CompletedProcess[str]

# variables a developer's terminal may set that would change Rich's output
TERMINAL_ENV = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


def run_cli(config: Path, *args: str, input: str | None = None) -> Result:  # noqa: A002
    """`smtpproxy --config CONFIG ARGS...` as a child process; stdin is `input` or empty."""
    env = {k: v for k, v in os.environ.items() if k != "SMTPPROXY_CONFIG"}
    for name in TERMINAL_ENV:
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "smtpproxy", "--config", str(config), *args],
        capture_output=True,
        text=True,
        input=input or "",
        timeout=60,
        env=env,
        cwd=config.parent,
        check=False,
    )


def ok(result: Result) -> str:
    """stdout of a command that must have succeeded."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def as_json(result: Result) -> Any:
    return json.loads(ok(result))


def fails(result: Result, *fragments: str, code: int = 1) -> str:
    """Check a clean failure: the exit code, nothing on stdout, no traceback, and stderr
    that is exactly one `error:` line (exit 1) or only `config error:` lines (exit 2)
    naming every fragment. Returns stderr."""
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
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
