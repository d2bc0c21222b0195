"""`smtpproxy tenant add|list|show|suspend|resume|delete`."""

from __future__ import annotations

import typer

from smtpproxy.cli.common import (
    JsonOption,
    YesOption,
    admin_database,
    confirmer,
    done,
    emit_object,
    emit_rows,
    now_or_already,
)

app = typer.Typer(
    help="Tenants: the customers that own accounts, providers and routes.", no_args_is_help=True
)

NameArgument = typer.Argument(..., help="Tenant name.")


@app.command()
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Tenant name (letters, digits, . _ -)."),
    monthly_limit: int = typer.Option(None, "--monthly-limit", help="Messages per calendar month."),
    allow_network: list[str] = typer.Option(
        [], "--allow-network", help="Only accept logins from this network (CIDR; repeat)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Create a tenant.

    Example: [bold]smtpproxy tenant add acme --monthly-limit 100000[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "create tenants", "admin") as conn:
        tid = admin.add_tenant(conn, name, monthly_limit, allow_network)
    done(f"tenant {name} created (id {tid})", as_json, id=tid, name=name)


@app.command()
def update(
    ctx: typer.Context,
    name: str = NameArgument,
    monthly_limit: int = typer.Option(None, "--monthly-limit", help="Messages per calendar month."),
    no_monthly_limit: bool = typer.Option(False, "--no-monthly-limit", help="Remove the quota."),
    allow_network: list[str] = typer.Option(
        [], "--allow-network", help="Only accept logins from these networks (replaces the list)."
    ),
    any_network: bool = typer.Option(False, "--any-network", help="Accept logins from anywhere."),
    as_json: bool = JsonOption,
) -> None:
    """Change a tenant's monthly quota or allowed login networks. Running instances
    apply the change within a second.

    Example: [bold]smtpproxy tenant update acme --allow-network 10.0.0.0/8[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.errors import UsageError

    if monthly_limit is not None and no_monthly_limit:
        raise UsageError("--monthly-limit and --no-monthly-limit contradict each other")
    if allow_network and any_network:
        raise UsageError("--allow-network and --any-network contradict each other")
    limit: int | admin.Unset | None = admin.UNSET
    if monthly_limit is not None or no_monthly_limit:
        limit = None if no_monthly_limit else monthly_limit
    networks = [] if any_network else (allow_network or None)
    with admin_database(ctx, "change tenants", "admin") as conn:
        view = admin.update_tenant(conn, name, monthly_limit=limit, networks=networks)
    done(f"tenant {name} updated", as_json, **view)


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List tenants with their numbers of accounts, providers and routes.

    Example: [bold]smtpproxy tenant list --json[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "list tenants", "viewer") as conn:
        rows = admin.list_tenants(conn)
    emit_rows(
        rows,
        ["id", "name", "status", "monthly_limit", "accounts", "providers", "routes", "created_at"],
        as_json,
        title="tenants",
    )


@app.command()
def show(ctx: typer.Context, name: str = NameArgument, as_json: bool = JsonOption) -> None:
    """Show one tenant with its accounts, providers, routes and number of messages.

    Example: [bold]smtpproxy tenant show acme[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "read tenants", "viewer") as conn:
        t = admin.tenant(conn, name)
        t["accounts"] = [a["username"] for a in admin.list_accounts(conn, name)]
        t["providers"] = [p["name"] for p in admin.list_providers(conn, name)]
        t["routes"] = [
            f"#{r['id']} prio {r['priority']} -> {r['provider']}"
            for r in admin.list_routes(conn, name)
        ]
        t["messages"] = admin.tenant_dependents(conn, t["id"])["messages"]
    emit_object(t, as_json)


def _set_status(ctx: typer.Context, name: str, status: str, as_json: bool) -> None:
    from smtpproxy import admin

    verb = "suspend" if status == "suspended" else "resume"
    with admin_database(ctx, f"{verb} tenants", "admin") as conn:
        changed = admin.set_tenant_status(conn, name, status)
    word = "suspended" if status == "suspended" else "active"
    now_or_already(f"tenant {name}", word, changed, as_json, name=name, status=status)


@app.command()
def suspend(ctx: typer.Context, name: str = NameArgument, as_json: bool = JsonOption) -> None:
    """Suspend a tenant: none of its accounts can log in until it is resumed.

    Mail already accepted is still delivered.

    Example: [bold]smtpproxy tenant suspend acme[/bold]
    """
    _set_status(ctx, name, "suspended", as_json)


@app.command()
def resume(ctx: typer.Context, name: str = NameArgument, as_json: bool = JsonOption) -> None:
    """Resume a suspended tenant: its active accounts can log in again.

    Example: [bold]smtpproxy tenant resume acme[/bold]
    """
    _set_status(ctx, name, "active", as_json)


@app.command()
def delete(
    ctx: typer.Context,
    name: str = NameArgument,
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete a tenant that has nothing left.

    A tenant that still has accounts, providers, routes or messages is refused, with
    their numbers: delete those first, or suspend the tenant instead. Asks for
    confirmation unless --yes.

    Example: [bold]smtpproxy tenant delete acme --yes[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "delete tenants", "admin") as conn:
        t = admin.delete_tenant(conn, name, confirmer(yes))
    done(f"tenant {name} deleted", as_json, id=t["id"], name=name, deleted=True)
