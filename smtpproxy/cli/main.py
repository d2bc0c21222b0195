"""The `smtpproxy` command: one Typer app, one module per command group.

Commands are thin: they parse arguments, call into smtpproxy, and print. Every
smtpproxy error becomes one line on stderr and an exit code: 0 ok, 1 failure,
2 usage or configuration error. No traceback reaches the user.

Starting must stay cheap (`smtpproxy --help` answers at once): the command modules import
their back end (psycopg, the admin queries, providers, trio) inside the command
functions, and tests/test_cli_imports.py checks that importing this module does not pull
them in.
"""

from __future__ import annotations

import sys

import typer

from smtpproxy.cli import (
    account,
    audit,
    db,
    device,
    dlq,
    fsck_storage,
    health,
    message,
    provider,
    queue,
    reports,
    route,
    run,
    send_test,
    tenant,
)
from smtpproxy.cli.common import error_line
from smtpproxy.errors import ConfigError, ListenError, SmtpProxyError

app = typer.Typer(
    name="smtpproxy",
    help="An SMTP relay that delivers through SendGrid, Amazon SES, Mailgun, Microsoft Graph, "
    "Postmark or an upstream SMTP server.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    rich_markup_mode="rich",
)


@app.callback()
def _global(
    ctx: typer.Context,
    config: str = typer.Option(
        None,
        "--config",
        "-c",
        help="Config file (default: $SMTPPROXY_CONFIG, ./smtpproxy.toml, "
        "/etc/smtpproxy/smtpproxy.toml).",
        metavar="PATH",
    ),
) -> None:
    # here, not in main(): `smtpproxy --help` never runs a command, nor loads loguru
    from smtpproxy.observe import logsetup

    logsetup.configure_cli()  # `run` replaces this with the configured outputs
    ctx.obj = {"config_path": config}


run.register(app)
fsck_storage.register(app)
reports.register(app)  # logs, stats
audit.register(app)
send_test.register(app)  # send-test
health.register(app)
app.add_typer(db.app, name="db")
app.add_typer(tenant.app, name="tenant")
app.add_typer(account.app, name="account")
app.add_typer(provider.app, name="provider")
app.add_typer(route.app, name="route")
app.add_typer(device.app, name="device")
app.add_typer(message.app, name="message", help="One message's whole story.")
app.add_typer(queue.app, name="queue", help="The delivery queue.")
app.add_typer(dlq.app, name="dlq", help="Dead letters: list, replay, purge.")


def main(argv: list[str] | None = None) -> None:
    """The `smtpproxy` script: the command line's arguments, or argv (the arguments
    after the program name), in this process; ends with SystemExit."""
    try:
        app(args=argv, prog_name="smtpproxy" if argv is not None else None)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            error_line(f"config error: {line}")
        sys.exit(2)
    except (SmtpProxyError, ListenError) as exc:
        error_line(f"error: {exc}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if not _is_database_error(exc):
            raise
        # one line, not a traceback, even for the unexpected
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error_line(f"error: database: {first}")
        sys.exit(1)


def _is_database_error(exc: Exception) -> bool:
    """A psycopg.Error, without importing psycopg for commands that never used it."""
    psycopg = sys.modules.get("psycopg")
    return psycopg is not None and isinstance(exc, psycopg.Error)


if __name__ == "__main__":
    main()
