"""RelaySMTP: the aiosmtpd SMTP protocol, adjusted where a relay on the internet needs it.

Runs on the ingress thread's asyncio loop; this and ingress/handler.py are the only
asyncio code in smtpproxy. Relies on aiosmtpd 1.4.6 internals (pinned in pyproject):
`_reader`, `_reader._buffer` (push-back of pipelined bytes), `_tls_protocol`,
`_set_post_data_state`, `_call_handler_hook`, `_getaddr`, `_getparams`; the tests in
tests/ingress/test_protocol.py compare its replies with stock aiosmtpd's on edge cases.

What differs from stock aiosmtpd:
* DATA is read in 64 KiB chunks by ingress/dataread.py (stock reads line by line) and
  rejects bare CR/LF (SMTP smuggling), closing the connection;
* the null sender <> is recorded as the empty reverse-path (stock keeps the string
  "<>"); MAIL SIZE= over the limit is 552 5.3.4; AUTH= is accepted (RFC 4954 5);
* AUTH PLAIN/LOGIN verify credentials asynchronously (on trio, through the handler);
  aborting with "*" gets exactly one reply; LOGIN prompts are "Username:"/"Password:";
  mechanism names are case-insensitive;
* implicit-TLS listeners count as TLS for AUTH;
* on a device listener (smtp.device_listen), a client inside a registered device's
  network needs no AUTH: its first transaction makes the session that device's account
  (AUTH before that still works, for devices that can log in);
* STARTTLS goes through the loop's start_tls (uvloop's C TLS layer, ~50 KB a session,
  not asyncio's SSLProtocol with its 256 KiB buffer); a second STARTTLS is refused;
* every 2xx/4xx/5xx reply carries an enhanced status code (ENHANCEDSTATUSCODES), the
  220 that answers STARTTLS included; HELP works before AUTH;
* an address is never changed: one with control characters (NUL) or invalid UTF-8 is
  refused (553 5.1.3), and a UTF-8 one needs the SMTPUTF8 parameter (553 5.6.7);
* a refused DATA with bytes pipelined after it (a client that sent its message
  without waiting for 354) ends the session (421), so no line of that message is ever
  read as a command;
* DATA must keep up smtp.min_data_rate (421 4.4.2 when it falls behind), and a line
  over smtp.max_line_length octets is refused with 554 5.6.0;
* sessions over the connection limit, or arriving while draining, get 421, and so does
  a session idle past smtp.timeout before it is closed;
* every reply is counted by command and code, and DATA-to-reply time is measured, for
  /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, TLSSetupException, syntax
from loguru import logger

from smtpproxy.ingress import replies
from smtpproxy.ingress.dataread import DataReader, Verdict
from smtpproxy.ingress.devices import Device
from smtpproxy.ingress.gate import Gate
from smtpproxy.models import AccountIdentity

_FAST_ADDR = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)>"
    r"(.*)\Z",
    re.S,
)
_CHUNK = 65536
# C0 controls and DEL, and the lone surrogates undecodable bytes become (surrogateescape)
_UNSAFE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


_GROUPED = frozenset({"MAIL", "RCPT", "RSET"})  # never the last command of a group


class _StartedTls:
    """What aiosmtpd reads of its TLS layer after STARTTLS (`_extra`, which becomes
    session.ssl), for a connection upgraded by loop.start_tls."""

    _NAMES = ("sslcontext", "peercert", "cipher", "compression", "ssl_object")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._extra = {name: transport.get_extra_info(name) for name in self._NAMES}


class RelaySession(Session):
    """aiosmtpd's session plus what smtpproxy tracks of it."""

    account: AccountIdentity | None = None
    device: str | None = None  # the registered device it sends as, without AUTH
    accepted: list[str]
    refused: int = 0
    ended: str = "closed"  # how it ended, for the session log line


class RelaySMTP(SMTP):
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(
        self,
        handler: Any,
        *,
        gate: Gate,
        implicit_tls: bool = False,
        auth_requires_tls: bool = True,
        max_line_length: int = 998,
        min_data_rate: int = 500,
        devices: Callable[[str], Device | None] | None = None,  # set on device listeners
        **kwargs: Any,
    ) -> None:
        # AUTH requirements are enforced here (check_auth_needed, smtp_AUTH) so that
        # implicit TLS counts as TLS; aiosmtpd's own checks are switched off.
        super().__init__(handler, auth_required=False, auth_require_tls=False, **kwargs)
        self._gate = gate
        self._implicit_tls = implicit_tls
        self._auth_requires_tls = auth_requires_tls
        self._max_line_length = max_line_length
        self._min_data_rate = min_data_rate
        self._devices = devices
        self._counted = False
        self._watching = False  # _release is due when the session task ends
        self._ip = ""
        self._started = 0.0
        self._deadline: asyncio.TimerHandle | None = None
        # per instance: aiosmtpd's class-level dict is shared by every session
        limit = self.command_size_limit  # not self: no cycle through the factory
        self.command_size_limits = collections.defaultdict(
            lambda: limit, {"MAIL": 1024, "RCPT": 1024}
        )
        # replies are counted under the command they answer
        self._command = "CONNECT"
        self._held = bytearray()  # replies waiting for the rest of a pipelined group
        self._smtp_methods = {
            name: self._tracked(name, method) for name, method in self._smtp_methods.items()
        }

    def _tracked(
        self, name: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)  # keeps the @syntax attributes HELP reads
        async def run(arg: str | None) -> None:
            self._command = name
            try:
                await method(arg)
            finally:
                self._command = "OTHER"  # e.g. "500 command not recognized"

        return run

    def _create_session(self) -> RelaySession:
        session = RelaySession(self.loop)
        session.accepted = []
        return session

    # typed views of aiosmtpd's Optional state, set before any command runs; no asserts:
    # aiosmtpd's __init__ reads every attribute (inspect.getmembers) before they exist
    @property
    def sess(self) -> RelaySession:
        return cast(RelaySession, self.session)

    @property
    def env(self) -> Envelope:
        return cast(Envelope, self.envelope)

    # -- session accounting --------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._counted:  # not the STARTTLS re-entry
            self._counted = True
            self._started = time.monotonic()
            peer = transport.get_extra_info("peername")
            self._ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            gate = self._gate
            gate.sessions += 1
            gate.per_ip[self._ip] = gate.per_ip.get(self._ip, 0) + 1
            gate.protocols.add(self)
            gate.metrics.smtp_sessions.inc()
            if gate.max_session_duration:
                self._deadline = self.loop.call_later(
                    gate.max_session_duration, self._session_too_long
                )
        super().connection_made(transport)
        task = self._handler_coroutine
        if task is not None and not self._watching:  # the first connection_made
            self._watching = True
            task.add_done_callback(lambda _: self._release())

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            gate = self._gate
            gate.sessions -= 1
            gate.ended += 1
            left = gate.per_ip.get(self._ip, 1) - 1
            if left:
                gate.per_ip[self._ip] = left
            else:
                gate.per_ip.pop(self._ip, None)
            gate.protocols.discard(self)
            if self._deadline is not None:
                self._deadline.cancel()
            self._log_session()
        super().connection_lost(error)
        self._release()

    def _release(self) -> None:
        """Once the session is over (connection lost and its task finished), drop what
        ties this protocol to itself: aiosmtpd's tables of bound methods, its stream
        writer and callbacks all point back here. Left as cycles, every session's TLS
        state and buffers waited for a full garbage collection: 2,000 STARTTLS
        sessions left ~100 MB resident after they closed."""
        task = self._handler_coroutine
        if self.transport is not None or task is None or not task.done():
            return
        self._smtp_methods = {}
        self._auth_methods = {}
        self._handler_coroutine = None
        self._client_connected_cb = None
        self._writer = None  # type: ignore[assignment]
        self._tls_protocol = None
        self._original_transport = None
        self._timeout_handle = None
        self._deadline = None

    def eof_received(self) -> bool | None:
        """The client closed its side: end the session. aiosmtpd cancels the session
        task and, on a plain connection, asks to keep the transport half open; when the
        client closed before that task first ran (a port scan, a load balancer's check)
        nothing ever closed it, and connection_lost, which gives back the connection
        slot, never came. SMTP has no use for a half-open connection."""
        super().eof_received()
        return False  # the transport closes itself, and connection_lost follows

    def _log_session(self) -> None:
        s = self.sess
        if s is None:
            return
        account = s.account.username if s.account else None
        device = {"device": s.device} if s.device else {}
        logger.bind(
            client_ip=self._ip,
            account=account,
            **device,
            message_ids=s.accepted,
            accepted=len(s.accepted),
            refused=s.refused,
            seconds=round(time.monotonic() - self._started, 3),
            ended=s.ended,
        ).info("SMTP session ended")

    def _timeout_cb(self) -> None:
        """smtp.timeout passed with nothing from the client: say so (RFC 5321 4.2.2
        reserves 421 for this), then close. Stock aiosmtpd closes without a word."""
        self.sess.ended = "idle timeout"
        self._hang_up(replies.IDLE_TIMEOUT)

    def _session_too_long(self) -> None:
        self.sess.ended = "too long"
        self._hang_up(replies.SESSION_TOO_LONG)

    def _hang_up(self, reply: str) -> None:
        """Write a final reply and close, from a callback (no await possible)."""
        if self.transport is not None:
            self._gate.metrics.reply(self._command, reply)
            self._writer.write(replies.with_enhanced_code(reply).encode() + b"\r\n")
            self._close_session()

    def _close_session(self) -> None:
        """Close now and read nothing more. Closing the transport alone is not enough:
        the session task would go on running whatever the client had already sent
        (pipelined commands, the rest of a message) from the read buffer until the
        close took effect; those bytes are dropped and the task is stopped."""
        self._reader._buffer.clear()  # type: ignore[attr-defined]
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _refuse_session(self) -> str | None:
        gate = self._gate
        if gate.draining:
            return replies.SHUTTING_DOWN
        if gate.sessions > gate.max_connections:
            return replies.TOO_MANY_CONNECTIONS
        if gate.max_per_ip and gate.per_ip.get(self._ip, 0) > gate.max_per_ip:
            return replies.TOO_MANY_FROM_ADDRESS
        return None

    async def _handle_client(self) -> None:
        refusal = self._refuse_session()
        if refusal is not None:
            self.sess.ended = "refused: " + refusal[:3]
            self._gate.metrics.reply("CONNECT", refusal)
            await self._send(refusal)
            self._close_session()
            return
        await super()._handle_client()

    async def _push_and_maybe_close(self, status: str) -> None:
        """Send a reply; a 421 also ends the session (RFC 5321 4.2.2)."""
        await self.push(status)
        if status.startswith("421") and self.transport is not None:
            self.sess.ended = "closed after " + status[:9]
            self._close_session()

    # -- replies -------------------------------------------------------------------
    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            self._gate.metrics.reply(self._command, status)
            await self._send(replies.with_enhanced_code(status))
        else:
            await self._send(status)

    async def _push_raw(self, line: str) -> None:
        if line[3:4] != "-":  # the last line of a multi-line reply
            self._gate.metrics.reply(self._command, line)
        await self._send(line)

    async def _send(self, status: str | bytes) -> None:
        """Write one reply line. A 250 to MAIL, RCPT or RSET is held while the client has
        already sent the next command of its pipelined group (RFC 2920 3.1 lets a server
        answer a group at once), so a message costs two writes, not four. Any other
        reply (a 421 that closes the session, say) goes out at once, after held ones."""
        if isinstance(status, str):
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        if (
            status.startswith(b"250 ")
            and self._command in _GROUPED
            and b"\n" in self._reader._buffer  # type: ignore[attr-defined]
        ):
            self._held += status + b"\r\n"
            return
        if self._held:
            status = bytes(self._held) + status
            self._held.clear()
        self._writer.write(status + b"\r\n")
        await self._writer.drain()

    def is_tls(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    def _auth_allowed_now(self) -> bool:
        return self.is_tls() or not self._auth_requires_tls

    async def check_auth_needed(self, caller_method: str) -> bool:
        if caller_method == "HELP" or (self.session is not None and self.session.authenticated):
            return False
        if self._as_device():
            return False
        await self.push("530 5.7.0 Authentication required")
        return True

    def _as_device(self) -> bool:
        """On a device listener, make a client inside a registered device's network that
        device's account, as if it had logged in. Asked at the first command that needs
        an account, so a device added a moment ago counts, and AUTH before it wins."""
        if self._devices is None or self.session is None:
            return False
        device = self._devices(self._ip)
        if device is None:
            return False
        self.sess.authenticated = True
        self.sess.account = device.identity
        self.sess.device = device.name
        self._gate.metrics.smtp_device_sessions.inc(device.name)
        return True

    # -- greeting commands ---------------------------------------------------------
    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 Syntax: HELO hostname")
            return
        self._set_rset_state()
        self.sess.extended_smtp = False
        self.sess.host_name = hostname
        await self._push_raw(f"250 {self.hostname}")

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self.sess.extended_smtp = True
        self.sess.host_name = hostname
        lines = [self.hostname, "PIPELINING"]
        if self.data_size_limit:
            lines.append(f"SIZE {self.data_size_limit}")
        lines += ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if self.tls_context and not self.is_tls():
            lines.append("STARTTLS")
        if self._auth_allowed_now():
            lines.append("AUTH LOGIN PLAIN")
        lines.append("HELP")
        for line in lines[:-1]:
            await self._push_raw(f"250-{line}")
        await self._push_raw(f"250 {lines[-1]}")

    # -- STARTTLS ------------------------------------------------------------------
    # Stock aiosmtpd wraps the connection in asyncio's pure-Python SSLProtocol, which
    # keeps a 256 KiB read buffer per session: 1,000 idle STARTTLS sessions took 415 MB.
    # The loop's own start_tls (uvloop's TLS layer, written in C) takes about 50 KB.
    @syntax("STARTTLS")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            await self.push("501 Syntax: STARTTLS")
            return
        if not self.tls_context:
            await self.push("454 4.7.0 TLS not available")
            return
        if self.is_tls():
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await self.push(replies.STARTTLS_READY)
        plain = self.transport
        assert plain is not None  # a command is running, so the connection is open
        try:
            tls = await self.loop.start_tls(
                cast(asyncio.WriteTransport, plain), self, self.tls_context, server_side=True
            )
        except (OSError, ValueError, TimeoutError) as exc:
            raise TLSSetupException() from exc  # aiosmtpd closes the connection
        if tls is None:  # the connection closed during the handshake
            raise TLSSetupException()
        self._original_transport = plain
        self._tls_protocol = cast(Any, _StartedTls(tls))
        # aiosmtpd's STARTTLS re-entry: fresh session (RFC 3207 4.2), plaintext pipelined
        # after STARTTLS discarded, the reader and writer moved onto the TLS transport
        self.connection_made(tls)

    # -- AUTH ----------------------------------------------------------------------
    # aiosmtpd's smtp_AUTH is replaced whole: its credential check is synchronous (we
    # verify on trio), it answers twice when a client aborts with "*", and it touches
    # the deprecated Session.login_data.
    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if await self.check_helo_needed("EHLO"):
            return
        if not self.sess.extended_smtp:
            await self.push("500 5.5.1 Error: command 'AUTH' not recognized")
            return
        if not self._auth_allowed_now():
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.sess.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        args = arg.split() if arg else []
        if not args or len(args) > 2:
            await self.push("501 5.5.4 Syntax: AUTH <mechanism> [initial-response]")
            return
        mechanism = args[0].upper()
        if mechanism == "PLAIN":
            credentials = await self._plain_credentials(args[1] if len(args) == 2 else None)
        elif mechanism == "LOGIN":
            credentials = await self._login_credentials(args[1] if len(args) == 2 else None)
        else:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        if credentials is None:
            return  # already answered (bad base64, abort)
        result = await self.event_handler.authenticate(self, self.session, *credentials)
        if isinstance(result, str):  # 454: the check failed; 421: too many failures
            await self._push_and_maybe_close(result)
        elif result is None:
            await self.push(replies.AUTH_INVALID)
        else:
            self.sess.authenticated = True
            self.sess.account = result
            await self.push("235 2.7.0 Authentication successful")

    async def _decode_b64(self, text: str) -> bytes | None:
        try:
            return b64decode(text.encode(), validate=True)
        except ValueError:
            await self.push("501 5.5.2 Can't decode base64")
            return None

    async def _challenge(self, prompt: str) -> bytes | None:
        """One 334 round trip; None when the client aborted or sent bad base64."""
        response = await self.challenge_auth(prompt)
        return None if response is MISSING else response  # challenge_auth answered

    async def _plain_credentials(self, initial: str | None) -> tuple[bytes, bytes] | None:
        blob = await (self._challenge("") if initial is None else self._decode_b64(initial))
        if blob is None:
            return None
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Can't split auth value")
            return None
        return parts[1], parts[2]

    async def _login_credentials(self, initial: str | None) -> tuple[bytes, bytes] | None:
        if initial is None:
            login = await self._challenge(self.AuthLoginUsernameChallenge)
        else:
            login = await self._decode_b64(initial)
        if login is None:
            return None
        password = await self._challenge(self.AuthLoginPasswordChallenge)
        if password is None:
            return None
        return login, password

    # -- envelope ------------------------------------------------------------------
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _FAST_ADDR.match(arg.lstrip()) if arg else None
        if m is None:
            if arg and arg.lstrip().startswith("<>"):
                return "", arg.lstrip()[2:].lstrip(" \t")
            return super()._getaddr(arg)
        return m.group(1), m.group(2).lstrip(" \t")

    async def _parse_path(
        self, arg: str | None, keyword: str, syntaxerr: str, *, null_ok: bool
    ) -> tuple[str, list[str], dict[str, str | bool]] | None:
        """The address, options and parameters of MAIL FROM:/RCPT TO:, or None after
        answering what is wrong with them."""
        arg = self._strip_command_keyword(keyword, arg) if arg is not None else None
        if arg is None:
            await self.push(syntaxerr)
            return None
        address, rest = self._getaddr(arg)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return None
        if _UNSAFE.search(address):
            await self.push(replies.MALFORMED_ADDRESS)  # never rewritten into another one
            return None
        if address == "" and not (null_ok and arg.lstrip().startswith("<>")):
            await self.push(syntaxerr)
            return None
        options = (rest or "").upper().split()
        params = self._getparams(options)
        if params is None:
            await self.push(syntaxerr)
            return None
        return address, options, params

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("MAIL"):
            return
        syntaxerr = "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
        parsed = await self._parse_path(arg, "FROM:", syntaxerr, null_ok=True)
        if parsed is None:
            return
        address, options, params = parsed
        if self.env.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if params.pop("BODY", "7BIT") not in ("7BIT", "8BITMIME"):
            await self.push("501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME")
            return
        smtputf8 = params.pop("SMTPUTF8", False)
        if smtputf8 is not False and smtputf8 is not True:
            await self.push("501 5.5.4 Error: SMTPUTF8 takes no arguments")
            return
        if not smtputf8 and not address.isascii():
            await self.push(replies.NEEDS_SMTPUTF8)
            return
        params.pop("AUTH", None)  # RFC 4954 5: we trust our own AUTH, not the client's claim
        size = params.pop("SIZE", None)
        if size is not None:
            if not isinstance(size, str) or not size.isdigit():
                await self.push(syntaxerr)
                return
            if self.data_size_limit and int(size) > self.data_size_limit:
                await self.push(replies.TOO_BIG)
                return
        if params:
            await self.push("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
            return
        status = await self._call_handler_hook("MAIL", address, options)
        if status is MISSING:
            status = replies.SENDER_OK
        if status.startswith("250"):
            self.env.mail_from = address
            self.env.mail_options.extend(options)
            self.env.smtp_utf8 = bool(smtputf8)
        await self._push_and_maybe_close(status)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("RCPT"):
            return
        if self.env.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        syntaxerr = "501 5.5.4 Syntax: RCPT TO:<address>"
        parsed = await self._parse_path(arg, "TO:", syntaxerr, null_ok=False)
        if parsed is None:
            return
        address, options, params = parsed
        if params:
            await self.push("555 5.5.4 RCPT TO parameters not recognized or not implemented")
            return
        if not self.env.smtp_utf8 and not address.isascii():
            await self.push(replies.NEEDS_SMTPUTF8)
            return
        status = await self._call_handler_hook("RCPT", address, options)
        if status is MISSING:
            status = replies.RECIPIENT_OK
        if status.startswith("250"):
            self.env.rcpt_tos.append(address)
            self.env.rcpt_options.extend(options)
        await self._push_and_maybe_close(status)

    # -- DATA ----------------------------------------------------------------------
    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            await self._refused_data()
            return
        if not self.env.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            await self._refused_data()
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            await self._refused_data()
            return
        self._gate.in_data += 1
        try:
            await self._receive_data()
        finally:
            self._gate.in_data -= 1

    async def _refused_data(self) -> None:
        """DATA was refused. A client that already sent more (its message, without
        waiting for 354: RFC 2920 makes DATA the last command of a group) would have
        every line of that message read as a command, MAIL/RCPT/DATA in it included:
        hang up instead, as Postfix does on improper pipelining."""
        if self._reader._buffer and self.transport is not None:  # type: ignore[attr-defined]
            self.sess.ended = "improper pipelining"
            await self.push(replies.IMPROPER_PIPELINING)
            self._close_session()

    async def _receive_data(self) -> None:
        await self._push_raw("354 End data with <CR><LF>.<CR><LF>")
        reader = DataReader(self.data_size_limit, self._max_line_length)
        # past the idle timeout, the data must keep up min_data_rate: a client trickling
        # a byte at a time cannot hold its connection slot for the whole session
        started, received = time.monotonic(), 0
        while True:
            chunk = await self._reader.read(_CHUNK)
            if not chunk:
                return  # EOF: the session is over
            self._reset_timeout()  # the idle timeout counts from the last bytes received
            received += len(chunk)
            if self._min_data_rate and time.monotonic() - started > (
                self._timeout_duration + received / self._min_data_rate
            ):
                self.sess.ended = "data too slow"
                await self.push(replies.DATA_TOO_SLOW)
                self._set_post_data_state()
                self._close_session()
                return
            result = reader.feed(chunk)
            if result is not None:
                break
        if result.verdict is Verdict.BARE_NEWLINE:
            # the client's idea of where data ends differs from ours: hang up rather than
            # read anything after this as commands
            await self.push(replies.BARE_NEWLINE)
            self._set_post_data_state()
            self._close_session()
            return
        if result.leftover:  # commands the client pipelined after the final dot
            self._reader._buffer[0:0] = result.leftover  # type: ignore[attr-defined]
        if result.verdict is Verdict.TOO_BIG:
            await self.push(replies.TOO_BIG)
            self._set_post_data_state()
            return
        if result.verdict is Verdict.LINE_TOO_LONG:
            await self.push(replies.LINE_TOO_LONG.format(limit=self._max_line_length))
            self._set_post_data_state()
            return
        self.env.content = self.env.original_content = result.content
        started = time.monotonic()
        status = await self._call_handler_hook("DATA")
        if status is MISSING:
            status = "250 2.0.0 Ok"
        metrics = self._gate.metrics
        metrics.ingest_seconds.observe(time.monotonic() - started)
        if status.startswith("250"):
            metrics.messages_accepted.inc()
            metrics.bytes_accepted.inc(amount=len(result.content))
        self._set_post_data_state()
        await self._push_and_maybe_close(status)
