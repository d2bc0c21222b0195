"""`smtpproxy route add|list|show|move|delete`."""

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
)

app = typer.Typer(help="Routing rules: which provider carries which mail.", no_args_is_help=True)

IdArgument = typer.Argument(..., help="Route id, as `route list` shows it.")


@app.command()
def add(
    ctx: typer.Context,
    tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant the rule belongs to."),
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

    with admin_database(ctx, "add routes", "operator") as conn:
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
    tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant's rules."),
    as_json: bool = JsonOption,
) -> None:
    """List routing rules in evaluation order.

    Example: [bold]smtpproxy route list --tenant acme[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "list routes", "viewer") as conn:
        rows = admin.list_routes(conn, tenant)
    emit_rows(rows, list(admin.ROUTE_FIELDS), as_json, title="routes")


@app.command()
def show(ctx: typer.Context, route_id: int = IdArgument, as_json: bool = JsonOption) -> None:
    """Show one routing rule.

    Example: [bold]smtpproxy route show 12[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "read routes", "viewer") as conn:
        row = admin.route(conn, route_id)
    emit_object({c: row[c] for c in [*admin.ROUTE_FIELDS, "created_at"]}, as_json)


@app.command()
def move(
    ctx: typer.Context,
    route_id: int = IdArgument,
    priority: int = typer.Option(None, "--priority", help="The rule's new priority."),
    before: int = typer.Option(
        None, "--before", help="Evaluate the rule just before this one.", metavar="ID"
    ),
    after: int = typer.Option(
        None, "--after", help="Evaluate the rule just after this one.", metavar="ID"
    ),
    as_json: bool = JsonOption,
) -> None:
    """Change where a rule comes in its tenant's evaluation order.

    Give it a priority, or put it just before or after another rule. When there is no
    room between the two neighbours, the tenant's rules are renumbered 10, 20, 30, ...
    in their new order.

    Example: [bold]smtpproxy route move 12 --before 7[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "change routes", "operator") as conn:
        changes = admin.move_route(conn, route_id, priority=priority, before=before, after=after)
        row = admin.route(conn, route_id)
    others = {i: p for i, p in changes.items() if i != route_id}
    message = (
        f"route {route_id} now has priority {row['priority']}"
        if changes
        else f"route {route_id} already has priority {row['priority']}"
    )
    if others:
        message += f" (renumbered {len(others)} other rule(s))"
    done(
        message,
        as_json,
        id=route_id,
        priority=row["priority"],
        changed={str(i): p for i, p in changes.items()},
    )


@app.command()
def delete(
    ctx: typer.Context,
    route_id: int = IdArgument,
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete a routing rule. Asks for confirmation unless --yes.

    Example: [bold]smtpproxy route delete 12 --yes[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "delete routes", "operator") as conn:
        r = admin.delete_route(conn, route_id, confirmer(yes))
    done(
        f"route {route_id} of tenant {r['tenant']} deleted",
        as_json,
        id=route_id,
        tenant=r["tenant"],
        deleted=True,
    )
