"""`smtpproxy db migrate|status|grant|revoke`: the schema and access control."""

from __future__ import annotations

import enum

import typer

from smtpproxy.cli.common import JsonOption, config, database, done, emit_rows

app = typer.Typer(help="Database schema and access control.", no_args_is_help=True)

RolePrefixOption = typer.Option(
    "smtpproxy",
    "--role-prefix",
    help="Prefix of the group role names (PREFIX_viewer, ...): give each smtpproxy "
    "installation that shares a PostgreSQL server its own.",
    metavar="PREFIX",
)


@app.command()
def migrate(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Apply pending schema migrations (safe to run from several hosts at once).

    Example: [bold]smtpproxy db migrate[/bold]
    """
    from smtpproxy.db import migrate as mig
    from smtpproxy.runtime import embedded

    applied = mig.migrate(embedded.database_url(config(ctx)))
    names = [f"{m.version:03d}_{m.name}" for m in applied]
    done(
        f"applied {len(names)} migration(s): {', '.join(names)}"
        if names
        else "schema is up to date",
        as_json,
        applied=names,
    )


@app.command()
def status(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Show which migrations are applied and which are pending.

    Example: [bold]smtpproxy db status[/bold]
    """
    from smtpproxy.db import migrate as mig
    from smtpproxy.db.pool import connect
    from smtpproxy.runtime import embedded

    url = embedded.database_url(config(ctx))
    with connect(url) as conn:
        have = mig.applied_versions(conn)
    rows = [
        {"version": f"{m.version:03d}", "name": m.name, "applied": m.version in have}
        for m in mig.available()
    ]
    emit_rows(rows, ["version", "name", "applied"], as_json, title="migrations")


class Role(enum.StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"


RoleOption = typer.Option(
    ...,
    "--role",
    "-r",
    help="viewer (read only), operator (accounts, providers, routes, replay) or admin.",
    case_sensitive=False,
)


@app.command()
def grant(
    ctx: typer.Context,
    user: str = typer.Argument(..., help="Existing database role (the login) to grant to."),
    role: Role = RoleOption,
    role_prefix: str = RolePrefixOption,
    as_json: bool = JsonOption,
) -> None:
    """Give a database user the viewer, operator or admin role.

    Creates the NOLOGIN group roles smtpproxy_viewer, smtpproxy_operator and
    smtpproxy_admin when missing, sets their privileges on this database (again, so run
    it after migrations too) and makes USER a member of the chosen one:

    - viewer reads tenants, accounts (never password hashes), providers (never
      secrets), routes, messages, delivery logs and the audit log
    - operator also manages accounts, providers and routes, tests providers and
      replays dead letters
    - admin may do everything, including tenants and deleting history

    Run it as the owner of smtpproxy's tables or a superuser, with CREATEROLE. USER must
    exist: create it in psql first, e.g. CREATE ROLE alice LOGIN PASSWORD '...'.

    Example: [bold]smtpproxy db grant --role operator alice[/bold]
    """
    import psycopg

    from smtpproxy import admin

    admin.role_name(role.value, role_prefix)  # a bad --role-prefix fails before connecting
    try:
        with database(ctx) as conn:
            group = admin.grant_role(conn, role.value, user, role_prefix)
    except psycopg.errors.InsufficientPrivilege:  # CREATE ROLE without CREATEROLE
        raise admin.role_admin_denied("grant roles") from None
    done(f"granted {group} to {user}", as_json, user=user, role=group)


@app.command()
def revoke(
    ctx: typer.Context,
    user: str = typer.Argument(..., help="Database role to take the role from."),
    role: Role = RoleOption,
    role_prefix: str = RolePrefixOption,
    as_json: bool = JsonOption,
) -> None:
    """Take the viewer, operator or admin role away from a database user.

    Example: [bold]smtpproxy db revoke --role operator alice[/bold]
    """
    import psycopg

    from smtpproxy import admin

    group = admin.role_name(role.value, role_prefix)
    try:
        with database(ctx) as conn:
            revoked = admin.revoke_role(conn, role.value, user, role_prefix)
    except psycopg.errors.InsufficientPrivilege:
        raise admin.role_admin_denied("revoke roles") from None
    done(
        f"revoked {group} from {user}" if revoked else f"{user} is not a member of {group}",
        as_json,
        user=user,
        role=group,
        revoked=revoked,
    )
