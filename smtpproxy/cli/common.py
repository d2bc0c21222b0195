"""What every CLI command shares: the loaded config, database access (with a missing
privilege turned into one line naming the role to ask for), confirmation of destructive
commands, reading secrets from stdin, and printing results as a rich table or as JSON."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from smtpproxy.errors import UsageError

if TYPE_CHECKING:  # imported by the commands that use them: `--help` stays fast
    import psycopg

    from smtpproxy.config import Config

console = Console()


def say(message: str) -> None:
    """A line of output that may contain user data: printed as is, never as markup."""
    console.print(message, markup=False, highlight=False, soft_wrap=True)


def error_line(message: str) -> None:
    """One line on stderr, never wrapped, never interpreted as markup."""
    sys.stderr.write(message.replace("\n", " ") + "\n")


JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table (for scripts).")


def config(ctx: typer.Context) -> Config:
    """The configuration, loaded once per invocation from the global --config option."""
    root = ctx.find_root()
    obj = root.obj if isinstance(root.obj, dict) else {}
    if "config" not in obj:
        from smtpproxy.config import load_config

        obj["config"] = load_config(obj.get("config_path"))
        root.obj = obj
    cfg: Config = obj["config"]
    return cfg


def ensure_schema(cfg: Config) -> str:
    """The database URL, once the schema is current: the embedded database is migrated on
    the spot, a real one must be migrated by the operator (`smtpproxy db migrate`)."""
    from smtpproxy.config import EMBEDDED
    from smtpproxy.db import migrate
    from smtpproxy.runtime import embedded

    url = embedded.database_url(cfg)
    timeout = cfg.database.connect_timeout
    pending = migrate.pending(url, connect_timeout=timeout)
    if pending:
        if cfg.database.url != EMBEDDED:
            raise UsageError(
                f"the database schema is {len(pending)} migration(s) behind: "
                "run `smtpproxy db migrate` first"
            )
        migrate.migrate(url, connect_timeout=timeout)
    return url


@contextmanager
def database(ctx: typer.Context) -> Iterator[psycopg.Connection[Any]]:
    """A connection for one command: committed when the command succeeds, rolled back
    when it fails, so nothing is ever half-written."""
    from smtpproxy.db.pool import connect

    cfg = config(ctx)
    url = ensure_schema(cfg)
    conn = connect(url, connect_timeout=cfg.database.connect_timeout)
    try:
        yield conn
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()


YesOption = typer.Option(
    False, "--yes", "-y", help="Do not ask for confirmation (needed when stdin is not a terminal)."
)


def _db_user(ctx: typer.Context) -> str:
    """The database user the command connects as, for messages."""
    import psycopg

    from smtpproxy.admin.audit import os_user

    try:
        user = psycopg.conninfo.conninfo_to_dict(config(ctx).database.url).get("user")
    except psycopg.ProgrammingError:
        user = None
    return str(user or os.environ.get("PGUSER") or os_user())


@contextmanager
def admin_database(ctx: typer.Context, doing: str, role: str) -> Iterator[psycopg.Connection[Any]]:
    """database(ctx), where a privilege the connected role lacks becomes one line:
    "permission denied: your database role cannot DOING; ask an admin to run
    `smtpproxy db grant --role ROLE USER`"."""
    import psycopg

    from smtpproxy.admin import permission_denied

    try:
        with database(ctx) as conn:
            yield conn
    except psycopg.errors.InsufficientPrivilege:
        raise permission_denied(doing, role, _db_user(ctx)) from None


def confirmer(yes: bool) -> Callable[[str], None]:
    """The confirm(question) callback of a destructive command: nothing with --yes, a
    y/N prompt on a terminal, and a refusal when stdin is not a terminal."""

    def confirm(question: str) -> None:
        if yes:
            return
        if not sys.stdin.isatty():
            action = question[:1].lower() + question[1:].rstrip("?")
            raise UsageError(
                f"refusing to {action} without confirmation: standard input is not a "
                "terminal (add --yes to confirm)"
            )
        if not typer.confirm(question, default=False):
            raise UsageError("not confirmed: nothing was changed")

    return confirm


def read_secret(prompt: str) -> str:
    """One secret from stdin: prompted without echo on a terminal, else the first line."""
    if sys.stdin.isatty():
        value = getpass.getpass(f"{prompt}: ")
    else:
        value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        raise UsageError(f"no {prompt.lower()} on standard input")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _cell(value: Any) -> Text:
    return Text(_cell_text(value))


def _cell_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def emit_rows(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool, title: str = ""
) -> None:
    if as_json:
        print(json.dumps([{c: _plain(r.get(c)) for c in columns} for r in rows], indent=2))
        return
    if not rows:
        console.print(f"[dim]no {title or 'rows'}[/dim]")
        return
    table = Table(title=title or None, title_justify="left")
    for c in columns:
        table.add_column(c.replace("_", " "))
    for r in rows:
        table.add_row(*(_cell(r.get(c)) for c in columns))
    console.print(table)


def emit_object(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(_plain(obj), indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for k, v in obj.items():
        table.add_row(Text(k.replace("_", " ")), _cell(v))
    console.print(table)


def done(message: str, as_json: bool = False, **data: Any) -> None:
    if as_json:
        print(json.dumps(_plain(data), indent=2))
    else:
        say(message)


def now_or_already(what: str, word: str, changed: bool, as_json: bool, **data: Any) -> None:
    """The answer to an enable, disable, suspend or resume: `<what> is now <word>`, or
    that it already was (JSON: the data and whether it changed)."""
    sentence = f"{what} is now {word}" if changed else f"{what} was already {word}"
    done(sentence, as_json, **data, changed=changed)
