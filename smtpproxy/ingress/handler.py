"""The aiosmtpd handler: per-command decisions on the ingress (asyncio) thread.

Cheap checks happen here: sender and header From domains, recipient count, backpressure,
the routed provider's size limit. Anything needing PostgreSQL, Redis, the store or CPU
goes to trio through a bridge portal: credentials to the Authenticator, rate and quota
counters to the Guard (only for accounts that have limits), accepted messages to the
group Committer.
"""

from __future__ import annotations

import email.utils
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import TLSSetupException
from loguru import logger

from smtpproxy.ids import new_message_id
from smtpproxy.ingress import admission, limits, replies
from smtpproxy.ingress.bridge import BridgeError, Portal
from smtpproxy.ingress.gate import Gate
from smtpproxy.mail.domains import any_matches, domain_of, is_qualified_mailbox
from smtpproxy.mail.headers import summarize
from smtpproxy.models import AccountIdentity, Submission
from smtpproxy.store import key_for

if TYPE_CHECKING:
    from smtpproxy.delivery.directory import DirectoryHolder

AuthFn = Callable[[bytes, bytes, str], Awaitable[AccountIdentity | str | None]]
MailCheck = Callable[[AccountIdentity], Awaitable[str | None]]


def peer_ip(session: Any) -> str:
    peer = getattr(session, "peer", None)
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""


class IngressHandler:
    def __init__(
        self,
        *,
        commit: Portal,
        calls: Portal,
        authenticate: AuthFn,
        max_recipients: int,
        gate: Gate | None = None,  # backlog and queue depth
        mail_check: MailCheck | None = None,  # Guard.mail: rate and quota counters
        check_header_from: bool = False,
        directory: DirectoryHolder | None = None,  # `.snapshot`: the routing snapshot
    ) -> None:
        self._commit = commit
        self._calls = calls
        self._auth = authenticate
        self._max_recipients = max_recipients
        self._gate = gate
        self._mail_check = mail_check
        self._check_header_from = check_header_from
        self._directory = directory

    async def authenticate(
        self, server: Any, session: Any, login: bytes, password: bytes
    ) -> AccountIdentity | str | None:
        try:
            result: AccountIdentity | str | None = await self._calls.submit(
                (self._auth, (login, password, peer_ip(session)))
            )
        except BridgeError:
            return replies.AUTH_TEMPFAIL
        return result

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        account: AccountIdentity = session.account
        if address and not is_qualified_mailbox(address):
            return replies.SENDER_UNQUALIFIED
        allowed = account.allowed_domains
        if address and allowed and not any_matches(allowed, domain_of(address)):
            logger.bind(account=account.username, client_ip=peer_ip(session)).info(
                "sender {} refused: not an allowed domain", address
            )
            return replies.SENDER_DENIED
        if self._gate is not None and self._gate.overloaded:
            return limits.BUSY_REPLY
        if account.limited and self._mail_check is not None:
            try:
                refusal: str | None = await self._calls.submit((self._mail_check, (account,)))
            except BridgeError:
                refusal = None  # limits are best effort; acceptance itself is not
            if refusal is not None:
                logger.bind(account=account.username, client_ip=peer_ip(session)).info(
                    "transaction refused: {}", refusal
                )
                return refusal
        return replies.SENDER_OK

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if not is_qualified_mailbox(address):
            return replies.RECIPIENT_UNQUALIFIED
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        declared = admission.declared_size(envelope.mail_options)
        if declared is not None:
            refusal = self._too_big(session, envelope, [address], declared)
            if refusal is not None:
                return refusal
        return replies.RECIPIENT_OK

    def _too_big(self, session: Any, envelope: Any, rcpts: list[str], size: int) -> str | None:
        """A 552 reply when a recipient's provider cannot take `size` bytes."""
        if self._directory is None:
            return None
        provider = admission.too_big_for(
            self._directory.snapshot, session.account, envelope.mail_from or "", rcpts, size
        )
        if provider is None:
            return None
        return f"552 5.3.4 Message too big for the provider that delivers this mail ({provider})"

    def _header_from_refused(self, account: AccountIdentity, header_from: str) -> bool:
        if not self._check_header_from or not account.allowed_domains:
            return False
        _, address = email.utils.parseaddr(header_from)
        return not address or not any_matches(account.allowed_domains, domain_of(address))

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await self._accept(session, envelope)
        if reply.startswith("250"):
            session.accepted.append(reply.rsplit(" ", 1)[1])
        else:
            session.refused += 1
        return reply

    async def _accept(self, session: Any, envelope: Any) -> str:
        body: bytes = envelope.original_content
        refusal = self._too_big(session, envelope, envelope.rcpt_tos, len(body))
        if refusal is not None:
            return refusal
        headers = summarize(body)
        account: AccountIdentity = session.account
        if self._header_from_refused(account, headers.from_):
            logger.bind(account=account.username, client_ip=peer_ip(session)).info(
                "message refused: header From {!r} not an allowed domain", headers.from_
            )
            return replies.HEADER_FROM_DENIED
        mid = new_message_id()
        sub = Submission(
            message_id=mid,
            account=account,
            mail_from=envelope.mail_from or "",
            rcpt_to=tuple(envelope.rcpt_tos),
            body=body,
            client_ip=peer_ip(session),
            headers=headers,
            storage_key=key_for(mid),
            sha256=hashlib.sha256(body).hexdigest(),
            device=session.device,
        )
        try:
            reply: str = await self._commit.submit(sub)
        except BridgeError:
            return replies.TEMPFAIL
        return reply

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # aiosmtpd closes the connection
            logger.info("STARTTLS handshake failed: {}", tls_failure(error.__cause__))
            return replies.TEMPFAIL
        logger.opt(exception=error).error("SMTP session error")
        return replies.TEMPFAIL


def tls_failure(cause: BaseException | None) -> str:
    """Why a handshake failed, in OpenSSL's words (UNSUPPORTED_PROTOCOL, NO_SHARED_CIPHER,
    ...): a client's old TLS or a port scanner is not an error of ours."""
    if cause is None:
        return "the client closed the connection"
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return str(cause.reason)
    return type(cause).__name__
