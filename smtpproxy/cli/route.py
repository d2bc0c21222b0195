"""`smtpproxy route add|list`."""

from __future__ import annotations

import typer

from smtpproxy.cli.common import JsonOption, database, done, emit_rows

app = typer.Typer(help="Routing rules: which provider carries which mail.", no_args_is_help=True)

COLUMNS = [
    "id",
    "tenant",
    "priority",
    "sender_domain",
    "recipient_domain",
    "account",
    "provider",
    "fallbacks",
    "enabled",
]


@app.command()
def add(
    ctx: typer.Context,
    tenant: str = typer.Option(..., "--tenant", "-t"),
    provider: str = typer.Option(
        ..., "--provider", "-p", help="Provider that carries matching mail."
    ),
    priority: int = typer.Option(
        None, "--priority", help="Lower runs first (default: after the last rule)."
    ),
    sender_domain: str = typer.Option(None, "--sender-domain", help="Glob, e.g. *.example.com."),
    recipient_domain: str = typer.Option(
        None, "--recipient-domain", help="Glob, e.g. example.org."
    ),
    account: str = typer.Option(None, "--account", help="Only mail from this account."),
    fallback: list[str] = typer.Option(
        [], "--fallback", help="Provider to try when the first fails (repeat)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Add a routing rule. A rule without conditions catches everything.

    Example:
    [bold]smtpproxy route add -t acme -p sg --recipient-domain '*.example.com'[/bold]
    """
    from smtpproxy import admin

    with database(ctx) as conn:
        rid = admin.add_route(
            conn,
            tenant,
            provider,
            priority=priority,
            sender_domain=sender_domain,
            recipient_domain=recipient_domain,
            account_name=account,
            fallbacks=fallback,
        )
    done(f"route {rid} added for tenant {tenant} -> {provider}", as_json, id=rid)


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str = typer.Option(None, "--tenant", "-t"),
    as_json: bool = JsonOption,
) -> None:
    """List routing rules in evaluation order."""
    from smtpproxy import admin

    with database(ctx) as conn:
        rows = admin.list_routes(conn, tenant)
    emit_rows(rows, COLUMNS, as_json, title="routes")
