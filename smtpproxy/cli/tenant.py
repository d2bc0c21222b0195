"""`smtpproxy tenant add|list|show`."""

from __future__ import annotations

import typer

from smtpproxy.cli.common import JsonOption, database, done, emit_object, emit_rows

app = typer.Typer(
    help="Tenants: the customers that own accounts, providers and routes.", no_args_is_help=True
)


@app.command()
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Tenant name (letters, digits, . _ -)."),
    monthly_limit: int = typer.Option(None, "--monthly-limit", help="Messages per calendar month."),
    as_json: bool = JsonOption,
) -> None:
    """Create a tenant.

    Example: [bold]smtpproxy tenant add acme --monthly-limit 100000[/bold]
    """
    from smtpproxy import admin

    with database(ctx) as conn:
        tid = admin.add_tenant(conn, name, monthly_limit)
    done(f"tenant {name} created (id {tid})", as_json, id=tid, name=name)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List tenants with their numbers of accounts, providers and routes."""
    from smtpproxy import admin

    with database(ctx) as conn:
        rows = admin.list_tenants(conn)
    emit_rows(
        rows,
        ["id", "name", "status", "monthly_limit", "accounts", "providers", "routes", "created_at"],
        as_json,
        title="tenants",
    )


@app.command()
def show(ctx: typer.Context, name: str, as_json: bool = JsonOption) -> None:
    """Show one tenant with its accounts, providers and routes.

    Example: [bold]smtpproxy tenant show acme[/bold]
    """
    from smtpproxy import admin

    with database(ctx) as conn:
        t = admin.tenant(conn, name)
        t["accounts"] = [a["username"] for a in admin.list_accounts(conn, name)]
        t["providers"] = [p["name"] for p in admin.list_providers(conn, name)]
        t["routes"] = [
            f"#{r['id']} prio {r['priority']} -> {r['provider']}"
            for r in admin.list_routes(conn, name)
        ]
    emit_object(t, as_json)
