"""Running the `smtpproxy` CLI in tests, and checking its results.

run_cli() calls the CLI's entry point (smtpproxy.cli.main.main) in this process, the way
the `smtpproxy` script does, and returns what a process would have: exit code, stdout,
stderr. It costs milliseconds where a new Python process costs a second or two.
run_cli_process() runs a real `python -m smtpproxy` for what only a process shows: the exit
status the shell sees, the environment it inherits, output on a pipe.

In process, the command's standard streams are this thread's only: another thread (a
service a test runs while the command does) still writes where it wrote before. Commands
started from several threads at once run one after the other. The
environment is the process's, changed for the duration of the call as cli_env() changes
it for a child; the working directory is the config file's, as for a child. Logging,
which the command sets up for itself, is put back afterwards.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

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
    """`smtpproxy --config CONFIG ARGS...` in this process, in the config's directory
    (without --config, in this one); stdin is `input` or empty, not a terminal. check:
    raise CalledProcessError when it exits non-zero. timeout is run_cli_process's; here a
    command that hangs is shown by pytest's faulthandler_timeout."""
    del timeout
    argv = command(config, *args)
    options = argv[3:]  # without `python -m smtpproxy`
    cwd = config.parent if config is not None else None
    # one command at a time (the environment, the working directory and logging are the
    # process's); logging is put back last: its default sink is the stderr from before
    with (
        _ONE_AT_A_TIME,
        _restored_logging(),
        _cli_environment(),
        _own_streams(input or "") as (stdout, stderr),
    ):
        with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
            code = _call_main(options)
        result = Result(argv, code, stdout.getvalue(), stderr.getvalue())
    if check:
        result.check_returncode()
    return result


_ONE_AT_A_TIME = threading.Lock()  # commands run from several threads wait their turn


def _call_main(options: list[str]) -> int:
    """main()'s exit status for these arguments; an exception that escapes main() is
    printed as the interpreter would (a traceback on stderr, status 1)."""
    from smtpproxy.cli.main import main

    try:
        main(options)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        print(exc.code, file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught error
        traceback.print_exc()
        return 1
    return 0


class _ThreadStream(io.TextIOBase):
    """sys.stdout/sys.stderr while a command runs: the calling thread's writes go to the
    command's capture, every other thread's where they went before."""

    def __init__(self, owner: int, captured: TextIO, before: TextIO) -> None:
        self._owner = owner
        self._captured = captured
        self._before = before

    def _target(self) -> TextIO:
        return self._captured if threading.get_ident() == self._owner else self._before

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return self._target().isatty()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer, ...
        return getattr(self._target(), name)


@contextlib.contextmanager
def _own_streams(stdin_text: str) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """This thread's stdin (input, not a terminal), stdout and stderr, as captures."""
    owner = threading.get_ident()
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = io.StringIO(stdin_text)
    sys.stdout = _ThreadStream(owner, out, saved[1])  # type: ignore[assignment]
    sys.stderr = _ThreadStream(owner, err, saved[2])  # type: ignore[assignment]
    try:
        yield out, err
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved


@contextlib.contextmanager
def _cli_environment() -> Iterator[None]:
    """os.environ as cli_env() makes it for a child, and 80 columns (what Rich gives a
    child whose output is a pipe)."""
    changes: dict[str, str | None] = dict.fromkeys(("SMTPPROXY_CONFIG", *TERMINAL_ENV))
    changes |= {"COLUMNS": "80", "LINES": "25"}
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            _set_env(name, value)
        yield
    finally:
        for name, value in saved.items():
            _set_env(name, value)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def _restored_logging() -> Iterator[None]:
    """The command sets up loguru and the logging module for itself (smtpproxy.observe.logsetup's
    configure_cli); afterwards this process logs as a test process does by default."""
    from loguru import logger

    from smtpproxy.observe import logsetup

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        logsetup.shutdown()
        logger.add(sys.stderr)
        root.handlers[:] = handlers
        root.setLevel(level)


def run_cli_process(
    config: Path | None,
    *args: str,
    input: str | None = None,  # noqa: A002
    timeout: float = 60,
    check: bool = False,
    env: dict[str, str] | None = None,
) -> Result:
    """`smtpproxy --config CONFIG ARGS...` as a child process in the config's directory
    (without --config, in this one); stdin is `input` or empty; env: variables to set.
    check: raise CalledProcessError when it exits non-zero."""
    return subprocess.run(
        command(config, *args),
        capture_output=True,
        text=True,
        input=input or "",
        timeout=timeout,
        env=cli_env() | (env or {}),
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
