"""The routing directory: a snapshot of rules, provider specs and the device table, and
the live provider objects built from them.

Loading is I/O (one read of routing_rules, providers and devices); everything after is
lookups in frozen values. The device table rides along so that ingress follows device
changes with the same reload (smtpproxy/ingress/devices.py). Provider secrets are decrypted
when the snapshot is loaded and live only in memory. A provider object is rebuilt only
when its spec changes, so its connection pool survives reloads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import attrs
import psycopg
from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.config import Config
from smtpproxy.config.crypto import SecretBox
from smtpproxy.db.queries import Q
from smtpproxy.delivery import providers
from smtpproxy.delivery.routing import Rule
from smtpproxy.errors import SecretError
from smtpproxy.ingress import devices
from smtpproxy.ingress.devices import DeviceTable


@attrs.frozen
class Snapshot:
    rules: Mapping[int, tuple[Rule, ...]]  # by tenant id, in evaluation order
    tenant_providers: Mapping[tuple[int, str], providers.ProviderSpec]
    global_providers: Mapping[str, providers.ProviderSpec]
    broken: Mapping[tuple[int | None, str], str]  # specs we could not load, and why
    default_route: str = ""
    # who may send without AUTH on a device listener
    devices: DeviceTable = attrs.field(factory=DeviceTable)

    def rules_for(self, tenant_id: int) -> tuple[Rule, ...]:
        return self.rules.get(tenant_id, ())

    def spec(self, tenant_id: int, name: str) -> providers.ProviderSpec | None:
        """A tenant's own provider shadows a config-file provider of the same name."""
        return self.tenant_providers.get((tenant_id, name)) or self.global_providers.get(name)

    def why_missing(self, tenant_id: int, name: str) -> str:
        reason = self.broken.get((tenant_id, name)) or self.broken.get((None, name))
        return reason or f"no provider named {name!r} for this tenant"


def global_specs(cfg: Config) -> dict[str, providers.ProviderSpec]:
    """Providers defined in the config file's [providers.NAME] tables."""
    out = {}
    for name, table in cfg.providers.items():
        settings = {k: v for k, v in table.items() if k not in ("type", "endpoint", "secret")}
        out[name] = providers.ProviderSpec(
            name=name,
            type=str(table["type"]),
            settings=settings,
            endpoint=table.get("endpoint"),
            secret=table.get("secret"),
        )
    return out


def load(conn: psycopg.Connection[tuple[object, ...]], cfg: Config, box: SecretBox) -> Snapshot:
    rules: dict[int, list[Rule]] = {}
    with conn.cursor(row_factory=dict_row) as cur:
        for row in cur.execute(Q.load_rules):
            rules.setdefault(row["tenant_id"], []).append(
                Rule(
                    id=row["id"],
                    tenant_id=row["tenant_id"],
                    priority=row["priority"],
                    provider=row["provider"],
                    sender_domain=row["sender_domain"],
                    recipient_domain=row["recipient_domain"],
                    account_id=row["account_id"],
                    fallbacks=tuple(row["fallbacks"]),
                    enabled=row["enabled"],
                )
            )
        specs: dict[tuple[int, str], providers.ProviderSpec] = {}
        broken: dict[tuple[int | None, str], str] = {}
        for row in cur.execute(Q.load_providers):
            key = (row["tenant_id"], row["name"])
            try:
                secret = box.decrypt(row["secret"]) if row["secret"] is not None else None
            except SecretError as exc:
                broken[key] = f"provider {row['name']}: {exc}"
                logger.error("{}", broken[key])
                continue
            specs[key] = providers.ProviderSpec(
                name=row["name"],
                type=row["type"],
                settings=row["settings"] or {},
                endpoint=row["endpoint"],
                secret=secret,
                tenant_id=row["tenant_id"],
                enabled=row["enabled"],
            )
    return Snapshot(
        rules={t: tuple(rs) for t, rs in rules.items()},
        tenant_providers=specs,
        global_providers=global_specs(cfg),
        broken=broken,
        default_route=cfg.delivery.default_route,
        devices=devices.load(conn),
    )


# a replaced provider may still be in the middle of a send: close it only later
RETIRE_AFTER = 120.0


class ProviderPool:
    """Live provider objects, keyed by (tenant, name), rebuilt when their spec changes."""

    def __init__(self) -> None:
        self._live: dict[
            tuple[int | None, str], tuple[providers.ProviderSpec, providers.Provider]
        ] = {}
        self._retired: list[tuple[float, providers.Provider]] = []

    def get(self, spec: providers.ProviderSpec) -> providers.Provider:
        key = (spec.tenant_id, spec.name)
        current = self._live.get(key)
        if current is not None and current[0] == spec:
            return current[1]
        provider = providers.build(spec)  # may raise ProviderConfigError
        if current is not None:
            self._retired.append((time.monotonic(), current[1]))
        self._live[key] = (spec, provider)
        return provider

    async def aclose_retired(self, older_than: float = RETIRE_AFTER) -> None:
        now = time.monotonic()
        due = [p for t, p in self._retired if now - t >= older_than]
        self._retired = [(t, p) for t, p in self._retired if now - t < older_than]
        for p in due:
            await p.aclose()

    async def aclose(self) -> None:
        await self.aclose_retired(older_than=0)
        live, self._live = self._live, {}
        for _, p in live.values():
            await p.aclose()


@attrs.define
class DirectoryHolder:
    """The current routing snapshot; replaced by the reload task."""

    snapshot: Snapshot
