"""The `smtpproxy` command as a real process, for what only a process shows: the exit
status the shell sees, the environment it inherits, and its output on a pipe. (The rest
of the CLI tests call the same entry point in the test process: tests/support/cli.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from smtpproxy import admin
from tests.conftest import CliConfigFactory
from tests.support.cli import cli_env, fails, ok, run_cli_process
from tests.support.process import write_config


@pytest.fixture
def config_path(cli_config_file: CliConfigFactory) -> Path:
    return cli_config_file()


def test_the_installed_script_shows_its_commands(tmp_path: Path) -> None:
    """The `smtpproxy` console script (pyproject's entry point) runs, exits 0 on --help and
    lists the command groups."""
    script = Path(sys.executable).with_name("smtpproxy")
    result = subprocess.run(
        [str(script), "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=tmp_path,
        timeout=60,
        check=False,
    )

    out = ok(result)
    for group in ("tenant", "account", "provider", "route", "db", "dlq"):
        assert group in out


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    """A config with two problems: the process exits 2 and stderr is exactly one
    `config error:` line for each, no traceback."""
    smtp = {"max_recipients": "many", "bogus": 1}
    path = write_config(tmp_path / "smtpproxy.toml", {"data_dir": str(tmp_path), "smtp": smtp})

    result = run_cli_process(path, "tenant", "list")

    fails(result, "smtp.max_recipients", "smtp.bogus", code=2)
    assert len(result.stderr.splitlines()) == 2


def test_usage_error_exits_2_without_a_traceback(config_path: Path) -> None:
    """An unknown option is a usage error: exit 2, the usage on stderr, nothing on stdout."""
    result = run_cli_process(config_path, "tenant", "list", "--no-such-option")

    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "No such option" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_from_the_environment(config_path: Path, tmp_path: Path) -> None:
    """Without --config, the process reads the file $SMTPPROXY_CONFIG names."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    result = subprocess.run(
        [sys.executable, "-m", "smtpproxy", "check-config"],
        capture_output=True,
        text=True,
        env=cli_env() | {"SMTPPROXY_CONFIG": str(config_path)},
        cwd=elsewhere,
        timeout=60,
        check=False,
    )

    assert f"config OK ({config_path})" in ok(result)


def test_a_table_on_a_pipe_is_plain_text_80_columns_wide(
    config_path: Path, conn: psycopg.Connection[Any]
) -> None:
    """`tenant list` writing to a pipe: a table no wider than 80 columns, without terminal
    escape sequences, naming every tenant."""
    names = [f"t{n}" for n in range(5)]
    for name in names:
        admin.add_tenant(conn, name)

    out = ok(run_cli_process(config_path, "tenant", "list"))

    assert "\x1b[" not in out
    assert max(len(line) for line in out.splitlines()) <= 80
    for name in names:
        assert name in out
