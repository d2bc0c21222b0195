"""`smtpproxy provider add|list|show|update|test|enable|disable|delete`."""

from __future__ import annotations

import json
from typing import Any

import typer

from smtpproxy.cli.common import (
    JsonOption,
    YesOption,
    admin_database,
    config,
    confirmer,
    done,
    emit_object,
    emit_rows,
    now_or_already,
    read_secret,
    say,
)
from smtpproxy.errors import UsageError

app = typer.Typer(help="Email providers a tenant delivers through.", no_args_is_help=True)

COLUMNS = ["id", "tenant", "name", "type", "endpoint", "settings", "has_secret", "enabled"]

NameArgument = typer.Argument(..., help="Provider name, unique within the tenant.")
TenantOption = typer.Option(..., "--tenant", "-t", help="Tenant the provider belongs to.")
SecretStdinOption = typer.Option(
    False, "--secret-stdin", help="Read the API key or password from standard input."
)
# a test message takes seconds; a provider that has not answered by then is broken
TEST_TIMEOUT = 120.0


def _types() -> list[str]:
    from smtpproxy.delivery.providers import TYPES

    return sorted(TYPES)


@app.command()
def add(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    ptype: str = typer.Option(
        ...,
        "--type",
        help="sendgrid, ses, mailgun, msgraph, postmark, smtp or file.",
        autocompletion=_types,
    ),
    endpoint: str = typer.Option(
        None,
        "--endpoint",
        help="Override the API base URL (smtp: smtp://host:port or smtps://host:port).",
    ),
    settings: list[str] = typer.Option([], "--set", help="Setting as key=value (repeat)."),
    secret_stdin: bool = SecretStdinOption,
    as_json: bool = JsonOption,
) -> None:
    """Add a provider. Its secret (API key) is read from stdin and stored encrypted.

    Example:
    [bold]smtpproxy provider add sg -t acme --type sendgrid --secret-stdin < key.txt[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.config.crypto import SecretBox

    secret = read_secret("Secret") if secret_stdin else None
    box = SecretBox.from_config(config(ctx))
    with admin_database(ctx, "add providers", "operator") as conn:
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
    tenant: str = typer.Option(None, "--tenant", "-t", help="Only this tenant's providers."),
    as_json: bool = JsonOption,
) -> None:
    """List providers (secrets are never shown).

    Example: [bold]smtpproxy provider list --tenant acme[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "list providers", "viewer") as conn:
        rows = admin.list_providers(conn, tenant)
    emit_rows(rows, COLUMNS, as_json, title="providers")


@app.command()
def show(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Show one provider; the secret shows only as present or absent.

    Also lists the routing rules that use it.

    Example: [bold]smtpproxy provider show sg --tenant acme[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "read providers", "viewer") as conn:
        row = admin.provider(conn, tenant, name)
        rules = admin.provider_rules(conn, row["id"])
    shown = {c: row[c] for c in [*COLUMNS, "created_at"]}
    shown["routes"] = [
        f"#{r['id']} prio {r['priority']}{'' if r['as_provider'] else ' (fallback)'}" for r in rules
    ]
    emit_object(shown, as_json)


@app.command()
def update(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    endpoint: str = typer.Option(
        None,
        "--endpoint",
        help="New API base URL (smtp: smtp://host:port); an empty string restores the default.",
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="Set or change a setting, key=value (repeat)."
    ),
    unset: list[str] = typer.Option([], "--unset", help="Remove a setting (repeat)."),
    secret_stdin: bool = typer.Option(
        False, "--secret-stdin", help="Replace the secret with one read from standard input."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Change a provider's endpoint, settings or secret.

    The result is checked against the provider type before anything is stored; running
    instances pick it up at once.

    Example:
    [bold]smtpproxy provider update sg -t acme --set region=eu --unset timeout[/bold]
    """
    from smtpproxy import admin
    from smtpproxy.config.crypto import SecretBox

    secret = read_secret("Secret") if secret_stdin else None
    encrypt = SecretBox.from_config(config(ctx)).encrypt if secret is not None else None
    with admin_database(ctx, "change providers", "operator") as conn:
        before, after = admin.update_provider(
            conn,
            tenant,
            name,
            endpoint=endpoint,
            settings=admin.parse_settings(settings),
            unset=unset,
            secret=secret,
            encrypt=encrypt,
        )
    changed = before != after or secret is not None
    changes = [k for k in ("endpoint", "settings") if before[k] != after[k]]
    if secret is not None:
        changes.append("secret")
    done(
        f"provider {name} of tenant {tenant} updated ({', '.join(changes)})"
        if changed
        else f"provider {name} of tenant {tenant} unchanged",
        as_json,
        name=name,
        tenant=tenant,
        changed=changes,
        endpoint=after["endpoint"],
        settings=after["settings"],
    )


def _set_enabled(ctx: typer.Context, name: str, tenant: str, enabled: bool, as_json: bool) -> None:
    from smtpproxy import admin

    verb = "enable" if enabled else "disable"
    with admin_database(ctx, f"{verb} providers", "operator") as conn:
        changed = admin.set_provider_enabled(conn, tenant, name, enabled)
    word = "enabled" if enabled else "disabled"
    now_or_already(
        f"provider {name} of tenant {tenant}",
        word,
        changed,
        as_json,
        name=name,
        tenant=tenant,
        enabled=enabled,
    )


@app.command()
def enable(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Enable a disabled provider: routing uses it again.

    Example: [bold]smtpproxy provider enable sg --tenant acme[/bold]
    """
    _set_enabled(ctx, name, tenant, True, as_json)


@app.command()
def disable(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    as_json: bool = JsonOption,
) -> None:
    """Disable a provider: routing skips it until it is enabled again.

    Rules that name it fall back to their fallbacks.

    Example: [bold]smtpproxy provider disable sg --tenant acme[/bold]
    """
    _set_enabled(ctx, name, tenant, False, as_json)


@app.command()
def delete(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    yes: bool = YesOption,
    as_json: bool = JsonOption,
) -> None:
    """Delete a provider that no routing rule uses.

    Refused while a routing rule uses it (as provider or fallback), naming those rules.
    Asks for confirmation unless --yes.

    Example: [bold]smtpproxy provider delete sg --tenant acme --yes[/bold]
    """
    from smtpproxy import admin

    with admin_database(ctx, "delete providers", "operator") as conn:
        p = admin.delete_provider(conn, tenant, name, confirmer(yes))
    done(
        f"provider {name} of tenant {tenant} deleted",
        as_json,
        id=p["id"],
        name=name,
        tenant=tenant,
        deleted=True,
    )


def _check_address(option: str, address: str) -> str:
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>," for c in address):
        raise UsageError(f"{option} {address!r}: expected an address like someone@example.com")
    return address


def compose_test_message(
    spec_name: str, tenant: str, mail_from: str, to: str, hostname: str
) -> bytes:
    """The small message `provider test` sends."""
    from email.message import EmailMessage
    from email.policy import SMTP
    from email.utils import formatdate, make_msgid

    msg = EmailMessage(policy=SMTP)
    msg["From"] = mail_from
    msg["To"] = to
    msg["Subject"] = f"smtpproxy test through provider {spec_name}"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("smtpproxy-test", domain=hostname)
    msg.set_content(
        f"This is a test message from `smtpproxy provider test`, sent through provider "
        f"{spec_name} of tenant {tenant}.\n\nNo action is needed.\n"
    )
    return msg.as_bytes()


async def _send(provider: Any, delivery: Any) -> Any:
    import trio

    from smtpproxy.models import Outcome

    try:
        with trio.move_on_after(TEST_TIMEOUT):
            return await provider.send(delivery)
        return Outcome.retry(f"no answer within {TEST_TIMEOUT:.0f} s")
    finally:
        await provider.aclose()


@app.command("test")
def test_command(
    ctx: typer.Context,
    name: str = NameArgument,
    tenant: str = TenantOption,
    to: str = typer.Option(..., "--to", help="Recipient of the test message."),
    mail_from: str = typer.Option(
        None,
        "--from",
        help="Sender (default smtpproxy-test@<smtp.hostname>); many providers accept only "
        "verified senders.",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Send a real test message through one provider and show its answer.

    Bypasses routing and the queue, and prints what the provider answered: delivered,
    retry (a temporary failure) or permanent, the provider's message id and any detail.
    Exit code 0 when delivered, 1 otherwise. Works for disabled providers too, so one
    can be checked before it is enabled.

    Example:
    [bold]smtpproxy provider test sg -t acme --to me@acme.com --from noreply@acme.com[/bold]
    """
    import trio

    from smtpproxy import admin
    from smtpproxy.admin.audit import MASK
    from smtpproxy.config.crypto import SecretBox
    from smtpproxy.delivery import providers
    from smtpproxy.ids import new_message_id
    from smtpproxy.models import OutcomeKind

    cfg = config(ctx)
    hostname = cfg.smtp.effective_hostname()
    to = _check_address("--to", to)
    mail_from = _check_address("--from", mail_from or f"smtpproxy-test@{hostname}")
    box = SecretBox.from_config(cfg)
    with admin_database(ctx, "test providers (it reads provider secrets)", "operator") as conn:
        spec = admin.provider_spec(conn, tenant, name, box.decrypt)
    provider = providers.build(spec)
    delivery = providers.Delivery(
        message_id=new_message_id(),
        tenant_id=spec.tenant_id or 0,
        account_id=0,
        mail_from=mail_from,
        recipients=(to,),
        body=compose_test_message(name, tenant, mail_from, to, hostname),
    )
    outcome = trio.run(_send, provider, delivery)

    def clean(text: str) -> str:
        return text.replace(spec.secret, MASK) if spec.secret else text

    delivered = outcome.kind == OutcomeKind.DELIVERED and to not in (
        *outcome.deferred,
        *outcome.rejected,
    )
    result = {
        "tenant": tenant,
        "provider": name,
        "type": spec.type,
        "enabled": spec.enabled,
        "from": mail_from,
        "to": to,
        "message_id": delivery.message_id,
        "delivered": delivered,
        "outcome": str(outcome.kind),
        "provider_message_id": outcome.provider_message_id,
        "detail": clean(outcome.detail),
        "retry_after": outcome.retry_after,
        "deferred": list(outcome.deferred),
        "rejected": list(outcome.rejected),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        head = "delivered" if delivered else "NOT delivered"
        say(f"{head}: {mail_from} -> {to} through provider {name} ({spec.type}) of tenant {tenant}")
        emit_object(
            {k: result[k] for k in ("outcome", "provider_message_id", "detail", "message_id")},
            False,
        )
        if not spec.enabled:
            say(f"note: provider {name} is disabled, so routing does not use it")
    raise typer.Exit(0 if delivered else 1)
