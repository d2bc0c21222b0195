"""Devices that cannot log in (smtp.device_listen): a printer-style client, speaking TLS
1.0 or sending without AUTH from a registered network, is accepted on the device
listener, goes through the same queue, limits and routing as its account, and is
refused on the default listener; with real clients over real sockets."""

from __future__ import annotations

import json
import smtplib
import ssl
import warnings
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from smtpproxy import admin
from smtpproxy.admin import devices as admin_devices
from smtpproxy.config import merge, structure
from smtpproxy.errors import ConfigError
from smtpproxy.ingress import devices
from smtpproxy.ingress.devices import Device, DeviceTable
from smtpproxy.models import AccountIdentity
from smtpproxy.runtime.service import Running
from tests.conftest import PASSWORD, CliConfigFactory, make_config
from tests.support import serving, smtp
from tests.support.cli import run_cli
from tests.support.serving import add_file_provider, wait_status

run = trio.to_thread.run_sync

PRINTER = "127.0.0.2"  # the registered device's address
STRANGER = "127.0.0.3"  # an address no device has


def legacy_tls(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client context that speaks this TLS version and nothing newer, as an old
    printer does (OpenSSL 3 needs security level 0 for TLS 1.0 and 1.1)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    TLS_1_0, TLS_1_1 = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1


def handshake(port: int, version: ssl.TLSVersion) -> str:
    """STARTTLS with a client limited to `version`; the version agreed."""
    with smtplib.SMTP(smtp.HOST, port, timeout=10) as client:
        client.ehlo("printer.test")
        client.starttls(context=legacy_tls(version))
        assert isinstance(client.sock, ssl.SSLSocket)
        return str(client.sock.version())


def printer_send(
    port: int,
    source: str,
    *,
    tls: ssl.TLSVersion | None = None,
    login: bool = False,
    mail_from: str = "scanner@example.com",
    rcpt_to: tuple[str, ...] = ("bob@example.org",),
) -> tuple[int, bytes]:
    """One transaction as a printer makes it, from `source`: optionally STARTTLS at
    `tls`, optionally AUTH; the first reply that is not a success, else DATA's."""
    with smtplib.SMTP(smtp.HOST, port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo("printer.test")
        if tls is not None:
            client.starttls(context=legacy_tls(tls))
            client.ehlo("printer.test")
        if login:
            smtp.login(client, "app", PASSWORD)
        code, reply = client.mail(mail_from)
        if code != 250:
            return code, reply
        for rcpt in rcpt_to:
            code, reply = client.rcpt(rcpt)
            if code != 250:
                return code, reply
        return client.data(smtp.message(sender=mail_from))


async def start(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, redis_url: str, prefix: str
) -> tuple[Running, trio.Event, int, int]:
    """The service with one default listener and one device listener; their ports."""
    cfg = make_config(tmp_path, pg_url, redis_url, prefix, smtp={"device_listen": ["127.0.0.1:0"]})
    running, stop = await serving.start(nursery, cfg)
    return running, stop, running.smtp[0][1], running.smtp[1][1]


@pytest.fixture
def printed(conn: psycopg.Connection[Any], account: dict[str, Any], tmp_path: Path) -> Path:
    """Account app's mail goes to the file provider `printed` (a rule limited to app)."""
    add_file_provider(conn, "printed", tmp_path / "printed")
    admin.add_route(
        conn,
        "acme",
        "printed",
        priority=None,
        sender_domain=None,
        recipient_domain=None,
        account_name="app",
    )
    return tmp_path / "printed"


async def test_tls_1_0_and_1_1_are_let_in_on_the_device_listener_only(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """A client that speaks only TLS 1.0 or 1.1 completes STARTTLS on the device listener
    and can log in and send there; on the default listener its handshake fails, which
    is logged as one line saying why (an old device at the wrong port is not an error
    of ours, and gets no traceback)."""
    _, stop, port, device_port = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    with serving.log_records() as lines, trio.fail_after(30):
        agreed = [await run(lambda v=v: handshake(device_port, v)) for v in (TLS_1_0, TLS_1_1)]
        for version in (TLS_1_0, TLS_1_1):
            with pytest.raises(ssl.SSLError):  # the server hangs up on the ClientHello
                await run(lambda v=version: handshake(port, v))
        code, _ = await run(lambda: printer_send(device_port, STRANGER, tls=TLS_1_0, login=True))
    stop.set()

    assert agreed == ["TLSv1", "TLSv1.1"]
    assert code == 250
    failed = [r["msg"] for r in lines if "handshake" in r["msg"]]
    assert failed == ["STARTTLS handshake failed: UNSUPPORTED_PROTOCOL"] * 2, lines
    assert [r["msg"] for r in lines if r["level"] == "ERROR"] == []


async def test_a_registered_network_sends_without_auth_on_the_device_listener_only(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    conn: psycopg.Connection[Any],
    account: dict[str, Any],
    printed: Path,
    nursery: trio.Nursery,
    cli_config_file: CliConfigFactory,
) -> None:
    """From the registered network, without AUTH, plain or over TLS 1.0, the device
    listener accepts mail as the device's account and it is delivered through that
    account's route; the account's sender domains apply. The same client gets 530 on
    the default listener, and an unregistered address gets 530 on the device listener.
    The session log line and the metrics name the device."""
    admin_devices.add_device(conn, "printer", f"{PRINTER}/32", "app", "2nd floor")
    with serving.log_records() as lines:
        running, stop, port, device_port = await start(
            nursery, tmp_path, pg_url, redis_url, key_prefix
        )
        with trio.fail_after(60):
            plain = await run(lambda: printer_send(device_port, PRINTER))
            over_tls = await run(lambda: printer_send(device_port, PRINTER, tls=TLS_1_0))
            wrong_sender = await run(
                lambda: printer_send(device_port, PRINTER, mail_from="scanner@elsewhere.test")
            )
            default = await run(lambda: printer_send(port, PRINTER))
            stranger = await run(lambda: printer_send(device_port, STRANGER))
            rows = [
                await wait_status(pg_url, smtp.queued_id(reply), "delivered", "failed")
                for _, reply in (plain, over_tls)
            ]
            while sum(line.get("msg") == "SMTP session ended" for line in lines) < 5:
                await trio.sleep(0.05)
            assert running.health is not None
            health_port = running.health[1]
            metrics = await run(lambda: serving.get_text(health_port))
        stop.set()

    assert plain[0] == over_tls[0] == 250
    assert wrong_sender[0] == 550
    assert default == (530, b"5.7.0 Authentication required")
    assert stranger == (530, b"5.7.0 Authentication required")
    for row in rows:
        assert (row["status"], row["provider_name"]) == ("delivered", "printed")
        assert (row["account_id"], row["client_ip"]) == (account["id"], PRINTER)
        envelope = json.loads((printed / f"{row['id']}.json").read_text())
        assert envelope["account_id"] == account["id"]
    sessions = [line for line in lines if line.get("msg") == "SMTP session ended"]
    from_printer = [s for s in sessions if s.get("device") == "printer"]
    assert len(from_printer) == 3
    assert all(s["account"] == "app" and s["client_ip"] == PRINTER for s in from_printer)
    assert [s["accepted"] for s in from_printer] == [1, 1, 0]
    others = [s for s in sessions if "device" not in s]
    assert [(s["client_ip"], s["account"]) for s in others] == [(PRINTER, None), (STRANGER, None)]
    assert 'smtpproxy_smtp_device_sessions_total{device="printer"} 3' in metrics
    assert [row["device"] for row in rows] == ["printer", "printer"]
    config = cli_config_file()
    story = run_cli(config, "message", "show", rows[0]["id"], check=True).stdout
    shown = json.loads(run_cli(config, "message", "show", rows[0]["id"], "--json").stdout)
    owner = json.loads(run_cli(config, "account", "show", "app", "--json", check=True).stdout)
    assert f"from {PRINTER}, device printer" in story
    assert shown["device"] == "printer"
    assert f"SMTP 250 from {PRINTER} (device printer) as app" in story
    assert owner["devices"] == ["printer"]


async def test_the_parts_of_a_split_device_message_name_the_device(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    conn: psycopg.Connection[Any],
    account: dict[str, Any],
    printed: Path,
    nursery: trio.Nursery,
) -> None:
    """A device's message whose recipients take two routes is split in two; each part
    is delivered through its own provider and still names the device that sent it."""
    admin_devices.add_device(conn, "printer", f"{PRINTER}/32", "app", "")
    add_file_provider(conn, "south", tmp_path / "south")
    admin.add_route(
        conn,
        "acme",
        "south",
        priority=1,
        sender_domain=None,
        recipient_domain="south.example",
        account_name=None,
    )
    _, stop, _, device_port = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    with trio.fail_after(60):
        code, reply = await run(
            lambda: printer_send(
                device_port, PRINTER, rcpt_to=("bob@example.org", "carol@south.example")
            )
        )
        mid = smtp.queued_id(reply)
        parent = await wait_status(pg_url, mid, "split")
        parts = [await wait_status(pg_url, f"{mid}.{n}", "delivered") for n in (1, 2)]
    stop.set()
    assert code == 250
    assert parent["device"] == "printer"
    assert sorted((p["provider_name"], p["rcpt_to"], p["device"]) for p in parts) == [
        ("printed", ["bob@example.org"], "printer"),
        ("south", ["carol@south.example"], "printer"),
    ]


async def wait_for_reply(port: int, source: str, code: int, timeout: float = 10) -> float:
    """Send as a printer until the reply code is `code`; the seconds that took."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        while (await run(lambda: printer_send(port, source)))[0] != code:
            await trio.sleep(0.2)
    return trio.current_time() - started


async def test_device_changes_apply_without_restart(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    conn: psycopg.Connection[Any],
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """A device added while the service runs may send within a few seconds; disabling
    it, or disabling its account, takes that away again, all without a restart."""
    _, stop, _, device_port = await start(nursery, tmp_path, pg_url, redis_url, key_prefix)
    with trio.fail_after(60):
        before = await run(lambda: printer_send(device_port, PRINTER))
        admin_devices.add_device(conn, "printer", PRINTER, "app")
        added = await wait_for_reply(device_port, PRINTER, 250)
        admin_devices.set_device_enabled(conn, "printer", False)
        disabled = await wait_for_reply(device_port, PRINTER, 530)
        admin_devices.set_device_enabled(conn, "printer", True)
        await wait_for_reply(device_port, PRINTER, 250)
        admin.set_account_status(conn, "app", "disabled")
        account_off = await wait_for_reply(device_port, PRINTER, 530)
    stop.set()

    assert before[0] == 530
    assert max(added, disabled, account_off) < 5


# -- the pure parts ------------------------------------------------------------------------


def identity(networks: tuple[str, ...] = ()) -> AccountIdentity:
    return AccountIdentity(1, 1, "app", "acme", (), networks=networks)


def test_device_table_finds_the_device_an_address_is() -> None:
    """A lookup finds the network holding the address (the narrowest, should networks
    nest), IPv4 clients seen as ::ffff:a.b.c.d on a dual-stack listener included; and
    admits it only when the tenant's allowed networks let the address in too."""
    table = DeviceTable.of(
        Device(name, devices.device_network(net), identity(tenant))
        for name, net, tenant in [
            ("lan", "10.0.5.0/24", ()),
            ("printer", "10.0.5.40", ()),
            ("v6", "2001:db8:5::/64", ()),
            ("fenced", "10.0.6.0/24", ("10.0.6.0/25",)),
        ]
    )

    def found(ip: str) -> str | None:
        device = table.match(ip)
        return device.name if device else None

    assert len(table) == 4
    assert found("10.0.5.40") == found("::ffff:10.0.5.40") == "printer"
    assert found("10.0.5.41") == "lan"
    assert found("2001:db8:5::99") == "v6"
    assert found("10.0.7.1") is found("2001:db8:6::1") is found("not an address") is None
    admitted = table.admit("10.0.6.1")
    assert admitted is not None and admitted.name == "fenced"
    assert table.admit("10.0.6.200") is None  # a device, but outside its tenant's networks


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.40", "192.0.2.40/32"),
        (" 192.0.2.7/24 ", "192.0.2.0/24"),
        ("10.0.0.0/16", "10.0.0.0/16"),
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("2001:db8::/48", "2001:db8::/48"),
    ],
)
def test_device_networks_are_canonical(text: str, expected: str) -> None:
    """Host bits are cleared, a bare address is one host, an IPv4-mapped network is IPv4."""
    assert str(devices.device_network(text)) == expected


@pytest.mark.parametrize("text", ["10.0.0.0/15", "0.0.0.0/0", "2001:db8::/47", "::/0", "x"])
def test_device_networks_wide_or_wrong_are_refused(text: str) -> None:
    """Wider than /16 (IPv4) or /48 (IPv6), or not a network: refused, saying why."""
    with pytest.raises(devices.NetworkError, match=r"too wide|expected an address"):
        devices.device_network(text)


def test_a_device_listener_needs_a_port_of_its_own(tmp_path: Path) -> None:
    """The same address in smtp.listen and smtp.device_listen is a config error naming
    the key; a port 0 (any free port) is not a clash."""
    base = {"data_dir": str(tmp_path), "smtp": {"listen": ["127.0.0.1:2525"]}}
    with pytest.raises(ConfigError, match=r"smtp\.device_listen\[0\]: 127\.0\.0\.1:2525"):
        structure(merge(base, {"smtp": {"device_listen": ["127.0.0.1:2525"]}}))
    clash_free = {"smtp": {"listen": ["127.0.0.1:0"], "device_listen": ["127.0.0.1:0"]}}
    assert structure(merge(base, clash_free)).smtp.device_tls_min == "1.0"
