"""`smtpproxy device add|list|disable|enable|remove`."""

from __future__ import annotations

import typer

from smtpproxy.cli.common import JsonOption, admin_database, done, emit_rows, now_or_already

app = typer.Typer(
    help="Devices that cannot log in: networks that send as an account, without AUTH, "
    "on the device listeners (smtp.device_listen) only.",
    no_args_is_help=True,
)

# the table leaves out what would squeeze names and networks on an 80-column terminal
COLUMNS = ["name", "network", "account", "enabled", "note"]
JSON_COLUMNS = ["id", "name", "network", "account", "tenant", "enabled", "note", "created_at"]

NameArgument = typer.Argument(..., help="Device name.")


@app.command()
def add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Device name (letters, digits, . _ -)."),
    network: str = typer.Option(
        ..., "--network", help="The device's address or subnet (CIDR), as narrow as it can be."
    ),
    account: str = typer.Option(..., "--account", help="The account its mail is sent as."),
    note: str = typer.Option("", "--note", help="What and where the device is."),
    as_json: bool = JsonOption,
) -> None:
    """Register a device: its network may send as the account without AUTH.

    Only on the device listeners (smtp.device_listen); running instances apply it
    within a second. Refused when the network overlaps another device's, is wider than
    /16 (IPv4) or /48 (IPv6), or lies outside the tenant's allowed networks.

    Example: [bold]smtpproxy device add printer-2f --network 192.0.2.40/32 --account scans[/bold]
    """
    from smtpproxy.admin import devices as admin_devices

    with admin_database(ctx, "add devices", "operator") as conn:
        view = admin_devices.add_device(conn, name, network, account, note)
    done(
        f"device {name} added: {view['network']} sends as account {account} "
        "on the device listeners",
        as_json,
        **view,
    )


@app.command("list")
def list_(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """List devices with their networks and accounts.

    Example: [bold]smtpproxy device list --json[/bold]
    """
    from smtpproxy.admin import devices as admin_devices

    with admin_database(ctx, "list devices", "viewer") as conn:
        rows = admin_devices.list_devices(conn)
    emit_rows(rows, JSON_COLUMNS if as_json else COLUMNS, as_json, title="devices")


def _set_enabled(ctx: typer.Context, name: str, enabled: bool, as_json: bool) -> None:
    from smtpproxy.admin import devices as admin_devices

    verb = "enable" if enabled else "disable"
    with admin_database(ctx, f"{verb} devices", "operator") as conn:
        changed = admin_devices.set_device_enabled(conn, name, enabled)
    word = "enabled" if enabled else "disabled"
    now_or_already(f"device {name}", word, changed, as_json, name=name, enabled=enabled)


@app.command()
def disable(ctx: typer.Context, name: str = NameArgument, as_json: bool = JsonOption) -> None:
    """Disable a device: its network needs AUTH again until it is enabled.

    Example: [bold]smtpproxy device disable printer-2f[/bold]
    """
    _set_enabled(ctx, name, False, as_json)


@app.command()
def enable(ctx: typer.Context, name: str = NameArgument, as_json: bool = JsonOption) -> None:
    """Enable a disabled device again.

    Example: [bold]smtpproxy device enable printer-2f[/bold]
    """
    _set_enabled(ctx, name, True, as_json)


@app.command()
def remove(ctx: typer.Context, name: str = NameArgument, as_json: bool = JsonOption) -> None:
    """Remove a device: its network needs AUTH again.

    The audit trail keeps what it was.

    Example: [bold]smtpproxy device remove printer-2f[/bold]
    """
    from smtpproxy.admin import devices as admin_devices

    with admin_database(ctx, "remove devices", "operator") as conn:
        d = admin_devices.remove_device(conn, name)
    done(f"device {name} removed", as_json, name=name, network=d["network"], removed=True)
