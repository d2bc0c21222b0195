"""`smtpproxy account add|list|show|passwd|disable|enable|delete`."""

from __future__ import annotations

import json

import typer
from rich.text import Text

from smtpproxy.cli.common import (
    JsonOption,
    YesOption,
    admin_database,
    confirmer,
    console,
    done,
    emit_object,
    emit_rows,
    now_or_already,
    read_secret,
    say,
)

app = typer.Typer(help="SMTP accounts: the credentials clients log in with.", no_args_is_help=True)

COLUMNS = ["id", "username", "tenant", "status", "allowed_domains", "created_at"]

UsernameArgument = typer.Argument(..., help="SMTP login name.")
PasswordStdinOption = typer.Option(
    False, "--password-stdin", help="Read the password from standard input."
)


def _print_password(password: str) -> None:
    console.print(Text.assemble("password: ", (password, "bold"), "  (shown once; store it now)"))


@app.command()
def add(
    ctx: typer.Context,
    username: str = UsernameArgument,
    tenant: str = typer.Option(..., "--tenant", "-t", help="Tenant the account belongs to."),
    allow_domain: list[str] = typer.Option(
        [],
        "--allow-domain",
        help="Sender domain this account may use (repeat; *.example.com works).",
    ),
    password_stdin: bool = PasswordStdinOption,
    rate_limit: str = typer.Option(
        None, "--rate-limit", help="Most messages per second, minute or hour: 10/s, 600/m, 5000/h."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Create an SMTP account. Without --password-stdin a strong password is generated
    and printed once.

    Example: [bold]smtpproxy account add app1 --tenant acme --allow-domain acme.com[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.config.passwords import generate_password, hash_password

    generated = not password_stdin
    password = generate_password() if generated else read_secret("Password")
    with admin_database(ctx, "create accounts", "operator") as conn:
        aid = admin.add_account(
            conn, username, tenant, hash_password(password), allow_domain, rate_limit=rate_limit
        )
    if as_json:
        out = {"id": aid, "username": username, "tenant": tenant}
        if generated:
            out["password"] = password
        print(json.dumps(out, indent=2))
        return
    say(f"account {username} created (id {aid}) in tenant {tenant}")
    if generated:
        _print_password(password)


@app.command()
def update(
    ctx: typer.Context,
    username: str = UsernameArgument,
    allow_domain: list[str] = typer.Option(
        [], "--allow-domain", help="Sender domains this account may use (replaces the list)."
    ),
    any_domain: bool = typer.Option(False, "--any-domain", help="Allow any sender domain."),
    rate_limit: str = typer.Option(None, "--rate-limit", help="10/s, 600/m or 5000/h."),
    no_rate_limit: bool = typer.Option(False, "--no-rate-limit", help="Remove the rate limit."),
    as_json: bool = JsonOption,
) -> None:
    """Change an account's allowed sender domains or sending rate. Running instances
    apply the change within a second.

    Example: [bold]smtpproxy account update app1 --rate-limit 600/m --allow-domain acme.com[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.errors import UsageError

    if rate_limit is not None and no_rate_limit:
        raise UsageError("--rate-limit and --no-rate-limit contradict each other")
    if allow_domain and any_domain:
        raise UsageError("--allow-domain and --any-domain contradict each other")
    rate: str | admin.Unset | None = admin.UNSET
    if rate_limit is not None or no_rate_limit:
        rate = None if no_rate_limit else rate_limit
    domains = [] if any_domain else (allow_domain or None)
    with admin_database(ctx, "change accounts", "operator") as conn:
        view = admin.update_account(conn, username, domains=domains, rate_limit=rate)
    done(f"account {username} updated", as_json, **view)


@app.command("list")
def list_(
    ctx: typer.Context,
    tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant's accounts."),
    as_json: bool = JsonOption,
) -> None:
    """List accounts.

    Example: [bold]smtpproxy account list --tenant acme[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "list accounts", "viewer") as conn:
        rows = admin.list_accounts(conn, tenant)
    emit_rows(rows, COLUMNS, as_json, title="accounts")


@app.command()
def show(ctx: typer.Context, username: str = UsernameArgument, as_json: bool = JsonOption) -> None:
    """Show one account (never its password).

    Also counts its live (queued, retrying, sending) and finished messages, and names
    the devices that send as it (`smtpproxy device`).

    Example: [bold]smtpproxy account show app1[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "read accounts", "viewer") as conn:
        row = admin.account(conn, username)
        messages = admin.account_messages(conn, row["id"])
        devices = admin.account_devices(conn, row["id"])
    shown = {c: row[c] for c in COLUMNS}
    shown["live_messages"] = messages["live"]
    shown["finished_messages"] = messages["finished"]
    shown["devices"] = devices
    emit_object(shown, as_json)


@app.command()
def passwd(
    ctx: typer.Context,
    username: str = UsernameArgument,
    password_stdin: bool = PasswordStdinOption,
    as_json: bool = JsonOption,
) -> None:
    """Set a new password for an account.

    Without --password-stdin a strong one is generated and printed once. Sessions
    already logged in are not affected.

    Example: [bold]printf '%s\\n' "$PW" | smtpproxy account passwd app1 --password-stdin[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.config.passwords import generate_password, hash_password

    generated = not password_stdin
    password = generate_password() if generated else read_secret("Password")
    with admin_database(ctx, "change account passwords", "operator") as conn:
        admin.set_password(conn, username, hash_password(password))
    if as_json:
        out = {"username": username, "changed": True}
        if generated:
            out["password"] = password
        print(json.dumps(out, indent=2))
        return
    say(f"password of account {username} changed")
    if generated:
        _print_password(password)


def _set_status(ctx: typer.Context, username: str, status: str, as_json: bool) -> None:
    from smtpproxy import admin

    verb = "disable" if status == "disabled" else "enable"
    with admin_database(ctx, f"{verb} accounts", "operator") as conn:
        changed = admin.set_account_status(conn, username, status)
    word = "disabled" if status == "disabled" else "active"
    now_or_already(f"account {username}", word, changed, as_json, username=username, status=status)


@app.command()
def disable(
    ctx: typer.Context, username: str = UsernameArgument, as_json: bool = JsonOption
) -> None:
    """Disable an account: it can no longer log in.

    Its mail already accepted is still delivered.

    Example: [bold]smtpproxy account disable app1[/bold]
    """
    _set_status(ctx, username, "disabled", as_json)


@app.command()
def enable(
    ctx: typer.Context, username: str = UsernameArgument, as_json: bool = JsonOption
) -> None:
    """Enable a disabled account again.

    Example: [bold]smtpproxy account enable app1[/bold]
    """
    _set_status(ctx, username, "active", as_json)


@app.command()
def delete(
    ctx: typer.Context,
    username: str = UsernameArgument,
    with_history: bool = typer.Option(
        False,
        "--with-history",
        help="Also delete the account's finished messages and their delivery logs (admin only).",
    ),
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete an account and the routing rules limited to it.

    Refused while the account has messages being delivered (queued, retrying, sending):
    disable it and wait. Refused while it has finished messages unless --with-history,
    which deletes them and their delivery logs too (their bodies are then removed by
    `fsck-storage`). To keep the history, disable the account instead. Asks for
    confirmation unless --yes.

    Example: [bold]smtpproxy account delete app1 --with-history --yes[/bold]
    """
    from smtpproxy import admin

    doing, role = "delete accounts", "operator"
    if with_history:
        doing, role = "delete message history", "admin"
    with admin_database(ctx, doing, role) as conn:
        a = admin.delete_account(conn, username, with_history=with_history, confirm=confirmer(yes))
    extra = []
    if a["routes"]:
        extra.append(f"{len(a['routes'])} routing rule(s)")
    if a["messages"]:
        extra.append(f"{a['messages']} finished message(s)")
    done(
        f"account {username} deleted" + (f" with {' and '.join(extra)}" if extra else ""),
        as_json,
        username=username,
        deleted=True,
        routes=a["routes"],
        messages=a["messages"],
    )
