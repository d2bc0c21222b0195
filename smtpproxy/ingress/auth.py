"""Checking SMTP credentials (runs on trio, called from AUTH through the bridge).

A login is valid when the account exists, its scrypt hash matches, and neither the
account nor its tenant is suspended; every failure looks the same to the client (535).
An unknown username still costs one scrypt run, so timing does not reveal which
usernames exist. A database outage is a 454 (try again), never a 535.
"""

from __future__ import annotations

from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.db.queries import Q
from smtpproxy.errors import DatabaseUnavailable
from smtpproxy.ingress import replies
from smtpproxy.models import AccountIdentity
from smtpproxy.passwords import hash_password, verify_password
from smtpproxy.resources import Resources

_DUMMY_HASH = hash_password("smtpproxy timing equaliser")


class Authenticator:
    def __init__(self, res: Resources) -> None:
        self._res = res

    async def verify(
        self, login: bytes, password: bytes, client_ip: str
    ) -> AccountIdentity | str | None:
        """The account, None for bad credentials, or a reply text when we cannot tell."""
        username = login.decode("utf-8", "replace")
        log = logger.bind(username=username, client_ip=client_ip)

        def lookup(conn):  # type: ignore[no-untyped-def]
            with conn.cursor(row_factory=dict_row) as cur:
                return cur.execute(Q.account_for_login, (username,)).fetchone()

        try:
            row = await self._res.db.run(lookup)
        except DatabaseUnavailable as exc:
            log.warning("AUTH could not be checked: {}", exc)
            return replies.AUTH_TEMPFAIL
        stored = row["password_hash"] if row else _DUMMY_HASH
        ok = await self._res.cpu_offload(verify_password, password, stored)
        if row is None or not ok:
            log.info("AUTH failed: bad credentials")
            return None
        if row["status"] != "active" or row["tenant_status"] != "active":
            log.info("AUTH failed: account or tenant suspended")
            return None
        return AccountIdentity(
            account_id=row["id"],
            tenant_id=row["tenant_id"],
            username=row["username"],
            tenant_name=row["tenant_name"],
            allowed_domains=tuple(row["allowed_domains"]),
        )
