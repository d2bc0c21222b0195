"""`smtpproxy provider add|list|show`."""

from __future__ import annotations

import typer

from smtpproxy.cli.common import (
    JsonOption,
    config,
    database,
    done,
    emit_object,
    emit_rows,
    read_secret,
)

app = typer.Typer(help="Email providers a tenant delivers through.", no_args_is_help=True)

COLUMNS = ["id", "tenant", "name", "type", "endpoint", "settings", "has_secret", "enabled"]


@app.command()
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Provider name, unique within the tenant."),
    tenant: str = typer.Option(..., "--tenant", "-t"),
    ptype: str = typer.Option(..., "--type", help="sendgrid or file."),
    endpoint: str = typer.Option(None, "--endpoint", help="Override the API base URL."),
    settings: list[str] = typer.Option([], "--set", help="Setting as key=value (repeat)."),
    secret_stdin: bool = typer.Option(
        False, "--secret-stdin", help="Read the API key or password from standard input."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Add a provider. Its secret (API key) is read from stdin and stored encrypted.

    Example:
    [bold]smtpproxy provider add sg -t acme --type sendgrid --secret-stdin < key.txt[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.crypto import SecretBox

    secret = read_secret("Secret") if secret_stdin else None
    box = SecretBox.from_config(config(ctx))
    with database(ctx) as conn:
        pid = admin.add_provider(
            conn,
            tenant,
            name,
            ptype,
            endpoint=endpoint,
            settings=admin.parse_settings(settings),
            secret=secret,
            encrypt=box.encrypt,
        )
    done(
        f"provider {name} ({ptype}) added to tenant {tenant} (id {pid})", as_json, id=pid, name=name
    )


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str = typer.Option(None, "--tenant", "-t"),
    as_json: bool = JsonOption,
) -> None:
    """List providers (secrets are never shown)."""
    from smtpproxy import admin

    with database(ctx) as conn:
        rows = admin.list_providers(conn, tenant)
    emit_rows(rows, COLUMNS, as_json, title="providers")


@app.command()
def show(
    ctx: typer.Context,
    name: str,
    tenant: str = typer.Option(..., "--tenant", "-t"),
    as_json: bool = JsonOption,
) -> None:
    """Show one provider; the secret shows only as present or absent.

    Example: [bold]smtpproxy provider show sg --tenant acme[/bold]
    """
    from smtpproxy import admin

    with database(ctx) as conn:
        row = admin.provider(conn, tenant, name)
    emit_object({c: row[c] for c in [*COLUMNS, "created_at"]}, as_json)
