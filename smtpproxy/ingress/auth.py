"""Checking SMTP credentials (runs on trio, called from AUTH through the bridge).

A login is valid when the account exists, its scrypt hash matches, neither the account
nor its tenant is suspended, and the client's address is in the tenant's allowed
networks (if any). Every failure looks the same to the client (535); an unknown username
still costs one scrypt run, so timing does not tell which usernames exist. A database
outage is a 454 (try again), never a 535.

Repeat logins are cheap: a successful check is remembered for smtp.auth_cache_ttl under
an HMAC of the username and password with a key that exists only in this process's
memory (no password is kept), so clients that open one connection per message do not
pay for scrypt each time. The cache is emptied whenever the configuration changes
(LISTEN/NOTIFY), so a new password or a suspension applies at once.

Failures are counted per client IP and per username, in Redis so that every instance
and process sees them (ingress/failures.py), and in memory as the fallback when Redis
does not answer (ingress/limits.FailureTracker): each is answered more slowly, and past
smtp.auth_max_failures the client gets 421 and further attempts are refused until the
window passes, except that a locked username still works from an address it logged in
from successfully in the last day.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio
from loguru import logger
from psycopg.rows import dict_row

from smtpproxy.config.passwords import hash_password, verify_password
from smtpproxy.db.pool import Conn
from smtpproxy.db.queries import Q
from smtpproxy.errors import DatabaseUnavailable, QueueUnavailable
from smtpproxy.ingress import replies
from smtpproxy.ingress.failures import Counts, SharedFailures
from smtpproxy.ingress.limits import TOO_MANY_FAILURES, FailureTracker, ip_allowed
from smtpproxy.models import AccountIdentity
from smtpproxy.runtime.resources import Resources

if TYPE_CHECKING:
    from loguru import Logger

T = TypeVar("T")
_DUMMY_HASH = hash_password("smtpproxy timing equaliser")
CACHE_SIZE = 10_000
COUNTS_TTL = 1.0  # seconds a read of the shared failure counts is used again
RESERVE_WAIT = 20.0  # longest an attempt waits for the outcome of others in progress
RESERVE_POLL = 0.05  # how often a waiting attempt asks again


@attrs.frozen
class _Ticket:
    """A place taken for one password check: in this process's tracker, and in Redis
    (reservation: its member there; "" while Redis does not answer)."""

    reservation: str
    counts: Counts | None


def identity_from_row(row: dict[str, Any]) -> AccountIdentity:
    return AccountIdentity(
        account_id=row["id"],
        tenant_id=row["tenant_id"],
        username=row["username"],
        tenant_name=row["tenant_name"],
        allowed_domains=tuple(row["allowed_domains"]),
        rate_limit=row.get("rate_limit"),
        monthly_limit=row.get("monthly_limit"),
        networks=tuple(row.get("allowed_networks") or ()),
    )


class Authenticator:
    def __init__(self, res: Resources) -> None:
        self._res = res
        smtp = res.cfg.smtp
        self._ttl = smtp.auth_cache_ttl
        self._key = os.urandom(32)
        self._cache: collections.OrderedDict[bytes, tuple[AccountIdentity, float]] = (
            collections.OrderedDict()
        )
        self.tracker = FailureTracker(
            max_failures=smtp.auth_max_failures, window=smtp.auth_failure_window
        )
        self.shared = SharedFailures(res.redis, res.cfg.redis.key_prefix, self.tracker)
        self._counts: dict[tuple[str, str], tuple[Counts, float]] = {}
        self._settled = trio.Event()  # set when an attempt of this process is decided
        # attempts waiting for a place, per (address, username), in the order they came
        self._lines: dict[tuple[str, str], collections.deque[object]] = {}
        self.cache_hits = 0
        self._pruned = 0.0

    def forget(self) -> None:
        """Drop every remembered login (the configuration changed)."""
        self._cache.clear()

    def _cache_key(self, login: bytes, password: bytes) -> bytes:
        return hmac.new(self._key, login + b"\0" + password, hashlib.sha256).digest()

    async def verify(
        self, login: bytes, password: bytes, client_ip: str
    ) -> AccountIdentity | str | None:
        """The account, None for bad credentials, or a reply text (454, 421) to send."""
        username = login.decode("utf-8", "replace")
        log = logger.bind(username=username, client_ip=client_ip)
        now = trio.current_time()
        if now - self._pruned > 60:  # forget old failures of clients that went away
            self._pruned = now
            self.tracker.prune(now)
        key = self._cache_key(login, password)
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            # credentials verified before: nothing is being guessed, only the lock applies
            locked, counts = await self._locked(client_ip, username, log)
            if locked:
                log.warning("AUTH refused: too many recent failures from this client or user")
                return TOO_MANY_FAILURES
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return await self._conclude(
                cached[0], client_ip, username, log, counts=counts, ticket=None
            )
        self._cache.pop(key, None)
        ticket = await self._reserve(client_ip, username, log)
        if isinstance(ticket, str):
            return ticket
        try:
            try:
                identity = await self._check(username, password, log)
            except DatabaseUnavailable as exc:
                log.warning("AUTH could not be checked: {}", exc)
                await self._counters(
                    lambda: self.shared.release(client_ip, username, ticket.reservation), None, log
                )
                return replies.AUTH_TEMPFAIL
            if identity is not None:
                self._remember(key, identity, now)
            return await self._conclude(
                identity, client_ip, username, log, counts=ticket.counts, ticket=ticket
            )
        finally:
            self.tracker.settle(client_ip, username)
            self._wake_waiters()

    async def _conclude(
        self,
        identity: AccountIdentity | None,
        client_ip: str,
        username: str,
        log: Logger,
        *,
        counts: Counts | None,
        ticket: _Ticket | None,  # None: the credentials were known good (cached)
    ) -> AccountIdentity | str | None:
        """Apply the tenant's networks, then count the failure or the success."""
        if identity is not None and not ip_allowed(client_ip, identity.networks):
            log.info("AUTH failed: client address not in the tenant's allowed networks")
            identity = None
        if identity is None:
            return await self._failed(client_ip, username, log, ticket)
        self.tracker.succeeded(client_ip, username, trio.current_time())
        reservation = ticket.reservation if ticket is not None else ""
        if reservation or (counts is not None and self.shared.success_changes_anything(counts)):
            await self._counters(
                lambda: self.shared.succeeded(client_ip, username, reservation), None, log
            )
            self._counts.pop((client_ip, username), None)
        return identity

    async def _reserve(self, client_ip: str, username: str, log: Logger) -> _Ticket | str:
        """A place for an attempt whose password is about to be checked, or the reply
        refusing it (421 locked; 454 when attempts in progress kept it waiting too long).

        The failures already counted and the attempts being checked right now together
        stay under smtp.auth_max_failures: an attempt that would pass it waits for the
        others' outcomes, so sessions opened at once get no more guesses than one
        session guessing in turn. In Redis for every instance; in this process alone
        while Redis does not answer. Attempts of one address and username waiting in
        this process take their places in the order they came, as if they came in turn:
        which of many parallel guesses is checked is not left to chance."""
        deadline = trio.current_time() + RESERVE_WAIT
        pair = (client_ip, username)
        line = self._lines.setdefault(pair, collections.deque())
        place = object()
        line.append(place)
        try:
            while True:
                if line[0] is place:
                    verdict, ticket = await self._try_reserve(client_ip, username, log)
                    if verdict == "ok":
                        return ticket
                    if verdict == "locked":
                        log.warning(
                            "AUTH refused: too many recent failures from this client or user"
                        )
                        return TOO_MANY_FAILURES
                if trio.current_time() >= deadline:
                    log.warning(
                        "AUTH deferred: too many attempts in progress for this client or user"
                    )
                    return replies.AUTH_TEMPFAIL
                with trio.move_on_after(RESERVE_POLL):  # another instance's outcome shows here
                    await self._settled.wait()
        finally:
            line.remove(place)
            if not line:
                del self._lines[pair]
            self._wake_waiters()  # the next in line may try now

    async def _try_reserve(self, client_ip: str, username: str, log: Logger) -> tuple[str, _Ticket]:
        """One try for a place: ('ok', its ticket), 'wait' or 'locked'."""
        # this process's own place first: should Redis stop answering halfway, the
        # checks already under way here still count
        verdict = self.tracker.reserve(client_ip, username, trio.current_time())
        ticket = _Ticket("", None)
        if verdict != "ok":
            return verdict, ticket
        try:
            verdict, counts, reservation = await self._res.redis_offload(
                self.shared.reserve, client_ip, username, time.time()
            )
            ticket = _Ticket(reservation, counts)
        except QueueUnavailable as exc:
            log.warning("AUTH failure counters unavailable in Redis, using ours: {}", exc)
        if verdict != "ok":
            self.tracker.settle(client_ip, username)
        return verdict, ticket

    def _wake_waiters(self) -> None:
        self._settled.set()
        self._settled = trio.Event()

    async def _locked(
        self, client_ip: str, username: str, log: Logger
    ) -> tuple[bool, Counts | None]:
        """Whether AUTH is refused for failures; the shared counts (None: Redis did
        not answer, and this process's own counts decided).

        Counts read (or written by a failure) in the last COUNTS_TTL are used again: a client
        opening a connection per message then costs no Redis round trip per login. A
        failure's own write returns them afresh (_failed), so the staleness can only let
        a login with the right password through in the moment its username or address
        was locked by failures in another process."""
        pair = (client_ip, username)
        now = trio.current_time()
        seen = self._counts.get(pair)
        if seen is not None and seen[1] > now:
            counts: Counts | None = seen[0]
        else:
            counts = await self._counters(
                lambda: self.shared.counts(client_ip, username, time.time()), None, log
            )
            self._remember_counts(pair, counts, now)
        if counts is None:
            return self.tracker.locked(client_ip, username, now), None
        return self.shared.locked(counts), counts

    def _remember_counts(self, pair: tuple[str, str], counts: Counts | None, now: float) -> None:
        if counts is None:
            self._counts.pop(pair, None)
            return
        if len(self._counts) >= CACHE_SIZE:
            self._counts = {k: v for k, v in self._counts.items() if v[1] > now}
        self._counts[pair] = (counts, now + COUNTS_TTL)

    async def _counters(self, shared: Callable[[], T], local: T, log: Logger) -> T:
        """The shared counters' answer; the in-memory one when Redis does not answer."""
        try:
            return await self._res.redis_offload(shared)
        except QueueUnavailable as exc:
            log.warning("AUTH failure counters unavailable in Redis, using this process's: {}", exc)
            return local

    async def _check(self, username: str, password: bytes, log: Logger) -> AccountIdentity | None:
        def lookup(conn: Conn) -> dict[str, Any] | None:
            with conn.cursor(row_factory=dict_row) as cur:
                row: dict[str, Any] | None = cur.execute(
                    Q.account_for_login, (username,)
                ).fetchone()
            return row

        row = await self._res.db.run(lookup)
        stored = row["password_hash"] if row else _DUMMY_HASH
        ok = await self._res.cpu_offload(verify_password, password, stored)
        if row is None or not ok:
            log.info("AUTH failed: bad credentials")
            return None
        if row["status"] != "active" or row["tenant_status"] != "active":
            log.info("AUTH failed: account or tenant suspended")
            return None
        return identity_from_row(row)

    def _remember(self, key: bytes, identity: AccountIdentity, now: float) -> None:
        if self._ttl <= 0:
            return
        self._cache[key] = (identity, now + self._ttl)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    async def _failed(
        self, client_ip: str, username: str, log: Logger, ticket: _Ticket | None
    ) -> str | None:
        """Count the failure (shared and here; the reserved attempt's, when it had one),
        wait, and say whether it locked AUTH. The shared counts the failure leaves
        decide, and are what the next login reads."""
        now = trio.current_time()
        local_delay = self.tracker.failed(client_ip, username, now)
        reservation = ticket.reservation if ticket is not None else ""
        counts = await self._counters(
            lambda: self.shared.failed(client_ip, username, time.time(), reservation), None, log
        )
        self._remember_counts((client_ip, username), counts, now)
        self._wake_waiters()  # attempts waiting on this one may now be refused at once
        await trio.sleep(local_delay if counts is None else self.shared.delay(counts))
        if counts is None:
            locked = self.tracker.locked(client_ip, username, trio.current_time())
        else:
            locked = self.shared.locked(counts)
        if locked:
            log.warning("AUTH failure limit reached: disconnecting")
            return TOO_MANY_FAILURES
        return None
