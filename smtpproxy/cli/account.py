"""`smtpproxy account add|list|show`."""

from __future__ import annotations

import typer
from rich.text import Text

from smtpproxy.cli.common import (
    JsonOption,
    console,
    database,
    emit_object,
    emit_rows,
    read_secret,
    say,
)

app = typer.Typer(help="SMTP accounts: the credentials clients log in with.", no_args_is_help=True)

COLUMNS = ["id", "username", "tenant", "status", "allowed_domains", "created_at"]


@app.command()
def add(
    ctx: typer.Context,
    username: str = typer.Argument(..., help="SMTP login name."),
    tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant the account belongs to."),
    allow_domain: list[str] = typer.Option(
        [],
        "--allow-domain",
        help="Sender domain this account may use (repeat; *.example.com works).",
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Create an SMTP account. Without --password-stdin a strong password is generated
    and printed once.

    Example: [bold]smtpproxy account add app1 --tenant acme --allow-domain acme.com[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.passwords import generate_password, hash_password

    generated = not password_stdin
    password = generate_password() if generated else read_secret("Password")
    with database(ctx) as conn:
        aid = admin.add_account(conn, username, tenant, hash_password(password), allow_domain)
    if as_json:
        import json

        out = {"id": aid, "username": username, "tenant": tenant}
        if generated:
            out["password"] = password
        print(json.dumps(out, indent=2))
        return
    say(f"account {username} created (id {aid}) in tenant {tenant}")
    if generated:
        console.print(
            Text.assemble("password: ", (password, "bold"), "  (shown once; store it now)")
        )


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant's accounts."),
    as_json: bool = JsonOption,
) -> None:
    """List accounts."""
    from smtpproxy import admin

    with database(ctx) as conn:
        rows = admin.list_accounts(conn, tenant)
    emit_rows(rows, COLUMNS, as_json, title="accounts")


@app.command()
def show(ctx: typer.Context, username: str, as_json: bool = JsonOption) -> None:
    """Show one account (never its password).

    Example: [bold]smtpproxy account show app1[/bold]
    """
    from smtpproxy import admin

    with database(ctx) as conn:
        row = admin.account(conn, username)
    emit_object({c: row[c] for c in COLUMNS}, as_json)
