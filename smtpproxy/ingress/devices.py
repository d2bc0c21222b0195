"""Devices that cannot log in: which registered device, if any, a client address is.

A device is a network (CIDR) mapped to an account. On a listener in smtp.device_listen,
and only there, a client whose address is inside an enabled device's network may send
without AUTH; the session is then the device's account, with every check an
authenticated session gets. The table is part of the routing snapshot
(delivery/directory.py), so a device added, disabled or removed, or a change to its
account or tenant, reaches running instances with the next reload (about a second after
the change is announced).

Owns the rule for a device network (how wide it may be) and the lookup; loading is one
query. Must not decide anything about listeners or sessions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import psycopg
from psycopg.rows import dict_row

from smtpproxy.db.queries import Q
from smtpproxy.ingress.auth import identity_from_row
from smtpproxy.ingress.limits import ip_allowed
from smtpproxy.models import AccountIdentity

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# A device network is a LAN segment, not an organisation: anything wider is almost
# certainly a mistake that would let a whole campus (or the internet) send unchecked.
WIDEST_PREFIX = {4: 16, 6: 48}


class NetworkError(ValueError):
    """The text is not a network a device may have; the message says why."""


def device_network(text: str) -> Network:
    """A device network in canonical form (host bits cleared; a bare address is /32 or
    /128); NetworkError when it is not one or is wider than WIDEST_PREFIX allows."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise NetworkError(
            f"network {text!r}: expected an address or CIDR like 192.0.2.0/24"
        ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped  # ::ffff:192.0.2.0/120 is 192.0.2.0/24
        if mapped is not None:
            net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    widest = WIDEST_PREFIX[net.version]
    if net.prefixlen < widest:
        raise NetworkError(
            f"network {net} is too wide for a device: register the devices' own subnet "
            f"(at most /{WIDEST_PREFIX[4]} for IPv4, /{WIDEST_PREFIX[6]} for IPv6)"
        )
    return net


@attrs.frozen
class Device:
    name: str
    network: Network
    identity: AccountIdentity  # the account its mail is sent as


def _address(ip: str) -> Address | None:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return addr


@attrs.frozen
class DeviceTable:
    """Enabled devices whose account and tenant are active, by network.

    Kept as one dict per (IP version, prefix length): a lookup masks the address once
    per prefix length in use, longest first, whatever the number of devices."""

    _by_prefix: Mapping[tuple[int, int], Mapping[int, Device]] = attrs.field(factory=dict)

    @classmethod
    def of(cls, devices: Iterable[Device]) -> DeviceTable:
        by_prefix: dict[tuple[int, int], dict[int, Device]] = {}
        for d in devices:
            key = (d.network.version, d.network.prefixlen)
            by_prefix.setdefault(key, {})[int(d.network.network_address)] = d
        ordered = sorted(by_prefix.items(), key=lambda kv: -kv[0][1])
        return cls(dict(ordered))

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_prefix.values())

    def match(self, ip: str) -> Device | None:
        """The device whose network holds ip (the narrowest, should networks nest)."""
        addr = _address(ip)
        if addr is None:
            return None
        value, bits = int(addr), addr.max_prefixlen
        for (version, prefixlen), devices in self._by_prefix.items():
            if version != addr.version:
                continue
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen)
            found = devices.get(value & mask)
            if found is not None:
                return found
        return None

    def admit(self, ip: str) -> Device | None:
        """The device a client at ip sends as, when its tenant lets that address in too
        (a tenant's allowed networks bind its devices as they bind its logins)."""
        device = self.match(ip)
        if device is None or not ip_allowed(ip, device.identity.networks):
            return None
        return device


def load(conn: psycopg.Connection[Any]) -> DeviceTable:
    """The devices ingress may admit now (enabled, account and tenant active)."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(Q.load_devices).fetchall()
    return DeviceTable.of(
        Device(
            name=row["device"],
            network=ipaddress.ip_network(row["network"]),
            identity=identity_from_row(row),
        )
        for row in rows
    )
