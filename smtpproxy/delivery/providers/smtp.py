"""Upstream SMTP relay ("smarthost"): delivers the exact bytes to another SMTP server.

The envelope goes out as given: MAIL FROM:<delivery.mail_from> (the null sender `<>`
when it is empty) and one RCPT TO per recipient; the body is sent byte for byte (it is
already CRLF-only), dot-stuffed on the wire and nothing else: no header or line end is
rewritten (a body that does not end in CRLF gets one: DATA cannot end otherwise).
BODY=8BITMIME is declared for 8-bit content when the server offers it (and the bytes go
unchanged when it does not), SMTPUTF8 when an address or the header section is not
ASCII (a non-ASCII address to a server without SMTPUTF8 is permanent), and SIZE when
the server announces a limit (a larger message is permanent without being sent).

asyncio SMTP clients cannot run under trio, so each send runs smtplib in a worker
thread (one slot per allowed connection, threads.Offload). Connections are pooled:
up to `max_connections` open, authenticated sessions. An idle one is checked with NOOP
before it is used again (and dropped after MAX_IDLE seconds or MAX_TRANSACTIONS
messages); a transaction that ended before the end-of-data reply is closed with RSET;
a connection that fails in any way, or that saw a 421, is discarded. A cancelled send()
waits for its thread (threads.py): each connect, write and reply wait is bounded by
`timeout`.

The three parts, as in every provider: build_transaction() (pure: the MAIL/RCPT
arguments and the wire bytes of DATA), classify() (pure: a Transcript of the replies to
an Outcome) and connection_failure() (pure: a connection, TLS or AUTH error to an
Outcome), and the SmtpProvider that does the I/O between them.

Classification:
  - MAIL FROM, DATA (the command or the end-of-data reply): 2xx/354 go on, 4xx retry,
    5xx permanent; an unparsable or unexpected reply retries.
  - RCPT TO per recipient: 5xx refusals are `rejected`, others `deferred`. With one
    accepted recipient and DATA 250 the outcome is DELIVERED with those lists; with none
    accepted it is retry if any refusal was temporary, else permanent.
  - DELIVERED's provider_message_id is the server's queue id ("queued as X", Exim's
    "id=X"), else the text of its 250 reply.
  - no connection, a timeout, a closed connection, a refused greeting/EHLO/STARTTLS, a
    failed TLS handshake: retry. A server that does not offer STARTTLS when tls is
    "starttls" is retried too (Postfix's "encrypt" level defers the same way): it is
    either a configuration change on the server (the retries give an operator time to
    notice; the message dead-letters if it is never fixed) or an attacker stripping
    STARTTLS, and in neither case is the message itself at fault. The password is
    never sent without TLS.
  - certificate verification failure: permanent (the configuration is wrong: ca_file or
    verify_tls); authentication refused with 5xx (535): permanent; 4xx (454): retry.
A connection lost after the final "." but before its reply is retried: SMTP cannot
tell whether the server took the message (RFC 1047), so this may deliver it twice.

The password never appears in an Outcome: every detail is scrubbed of it (and of its
base64 form) before send() returns.
"""

from __future__ import annotations

import base64
import contextlib
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs
import trio

from smtpproxy.config import ConfigValueError, parse_duration
from smtpproxy.delivery.providers import http
from smtpproxy.delivery.providers.base import (
    Delivery,
    ProviderConfigError,
    ProviderSpec,
    ProviderType,
    SettingInfo,
)
from smtpproxy.models import Outcome, OutcomeKind
from smtpproxy.runtime.threads import Offload

TlsMode = Literal["starttls", "implicit", "none"]
TLS_MODES: tuple[TlsMode, ...] = ("starttls", "implicit", "none")
DEFAULT_PORTS: Mapping[TlsMode, int] = {"starttls": 587, "implicit": 465, "none": 587}
SCHEMES: Mapping[str, TlsMode] = {"smtp": "starttls", "smtps": "implicit"}
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 4
MAX_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8: every server must take at least 100
MAX_IDLE = 60.0  # seconds an idle connection is kept for reuse
MAX_TRANSACTIONS = 100  # messages per connection before it is replaced
QUIT_TIMEOUT = 5.0
MAX_ID_LENGTH = 200
_QUEUE_ID = (
    re.compile(r"queued as\s+<?([^\s<>;,]+)>?", re.IGNORECASE),
    re.compile(r"\bid=([^\s;,]+)", re.IGNORECASE),
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RequestError(ValueError):
    """The delivery cannot be sent to this server as it is (a permanent failure)."""


# ---------------------------------------------------------------------------- settings


@attrs.frozen
class Settings:
    host: str
    port: int
    tls: TlsMode = "starttls"
    verify_tls: bool = True
    ca_file: str | None = None
    username: str | None = None
    helo_name: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    allow_plaintext_auth: bool = False

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _bool(spec: ProviderSpec, key: str, default: bool) -> bool:
    value = spec.setting(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.strip().lower() in ("true", "yes", "1")
    raise ProviderConfigError(f"provider {spec.name}: setting {key!r} must be true or false")


def _int(spec: ProviderSpec, key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProviderConfigError(
            f"provider {spec.name}: setting {key!r} must be a whole number from {low} to {high}"
        )
    return value


def _endpoint(spec: ProviderSpec) -> tuple[str | None, int | None, TlsMode | None]:
    """host, port and TLS mode from an endpoint like smtp://host:587 or smtps://host."""
    if not spec.endpoint:
        return None, None, None
    bad = ProviderConfigError(
        f"provider {spec.name}: endpoint must look like smtp://host[:port] or smtps://host[:port]"
    )
    try:
        url = urlsplit(spec.endpoint)
        port = url.port
    except ValueError:
        raise bad from None
    scheme = url.scheme.lower()
    if scheme not in SCHEMES or not url.hostname or url.username or url.password:
        raise bad  # (the endpoint itself is not echoed: it might hold a password)
    if url.path not in ("", "/") or url.query or url.fragment:
        raise bad
    return url.hostname, port, SCHEMES[scheme]


def parse_settings(spec: ProviderSpec) -> Settings:
    """The settings of spec, checked; ProviderConfigError names the one that is wrong."""
    name = spec.name
    ep_host, ep_port, ep_tls = _endpoint(spec)
    host = spec.setting("host") or ep_host
    if not host or not isinstance(host, str):
        raise ProviderConfigError(
            f"provider {name}: setting 'host' is required (or an endpoint smtp://host:port)"
        )
    tls = spec.setting("tls", ep_tls or "starttls")
    if tls not in TLS_MODES:
        raise ProviderConfigError(
            f"provider {name}: setting 'tls' must be 'starttls', 'implicit' or 'none'"
        )
    if ep_tls == "implicit" and tls != "implicit":
        raise ProviderConfigError(
            f"provider {name}: an smtps:// endpoint means tls = 'implicit', not {tls!r}"
        )
    port = _int(spec, "port", spec.setting("port", ep_port or DEFAULT_PORTS[tls]), 1, 65535)
    try:
        timeout = parse_duration(spec.setting("timeout", DEFAULT_TIMEOUT))
    except ConfigValueError as exc:
        raise ProviderConfigError(f"provider {name}: setting 'timeout': {exc}") from None
    if timeout <= 0:
        raise ProviderConfigError(f"provider {name}: setting 'timeout' must be positive")
    max_connections = _int(
        spec, "max_connections", spec.setting("max_connections", DEFAULT_MAX_CONNECTIONS), 1, 1000
    )
    username = spec.setting("username") or None
    if username is not None and (not isinstance(username, str) or _CONTROL.search(username)):
        raise ProviderConfigError(f"provider {name}: setting 'username' must be a plain string")
    helo_name = spec.setting("helo_name") or None
    if helo_name is not None and (
        not isinstance(helo_name, str) or not helo_name.isascii() or re.search(r"\s", helo_name)
    ):
        raise ProviderConfigError(
            f"provider {name}: setting 'helo_name' must be a host name without spaces"
        )
    ca_file = spec.setting("ca_file") or None
    if ca_file is not None and not isinstance(ca_file, str):
        raise ProviderConfigError(f"provider {name}: setting 'ca_file' must be a file path")
    settings = Settings(
        host=host,
        port=port,
        tls=tls,
        verify_tls=_bool(spec, "verify_tls", True),
        ca_file=ca_file,
        username=username,
        helo_name=helo_name,
        timeout=timeout,
        max_connections=max_connections,
        allow_plaintext_auth=_bool(spec, "allow_plaintext_auth", False),
    )
    if username is None and spec.secret:
        raise ProviderConfigError(
            f"provider {name}: a password is stored but setting 'username' is not set"
        )
    if username is not None and tls == "none" and not settings.allow_plaintext_auth:
        raise ProviderConfigError(
            f"provider {name}: AUTH without TLS would send the password in clear text; "
            "use tls = 'starttls' or 'implicit' (or set allow_plaintext_auth = true)"
        )
    return settings


def tls_context(settings: Settings, provider: str) -> ssl.SSLContext:
    """The client context: TLS 1.2 or newer; verifies the host name unless verify_tls is off."""
    try:
        ctx = ssl.create_default_context(cafile=settings.ca_file if settings.verify_tls else None)
    except (OSError, ssl.SSLError) as exc:
        raise ProviderConfigError(
            f"provider {provider}: setting 'ca_file': cannot load {settings.ca_file}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------------------- request


@attrs.frozen
class Transaction:
    """What goes on the wire for one delivery: arguments of MAIL and RCPT, DATA bytes."""

    mail_arg: str  # "FROM:<a@example.com> BODY=8BITMIME SIZE=1234"
    rcpt_args: tuple[tuple[str, str], ...]  # (recipient, "TO:<b@example.org>")
    data: bytes = attrs.field(repr=False)  # dot-stuffed, ends with CRLF.CRLF
    smtputf8: bool = False


def stuff(body: bytes) -> bytes:
    """The DATA bytes: a dot doubled at the start of every line, then the terminator."""
    out = re.sub(rb"(?m)^\.", b"..", body)
    if not out.endswith(b"\r\n"):
        out += b"\r\n"
    return out + b".\r\n"


def _header_section(body: bytes) -> bytes:
    end = body.find(b"\r\n\r\n")
    return body if end < 0 else body[:end]


def build_transaction(delivery: Delivery, features: Mapping[str, str] | None) -> Transaction:
    """The commands for delivery to a server announcing features (EHLO keywords,
    lower-case, as smtplib.SMTP.esmtp_features; None for a server that only knows HELO).
    Raises RequestError when the server cannot take this delivery."""
    addresses = (delivery.mail_from, *delivery.recipients)
    for address in addresses:
        if _CONTROL.search(address) or "<" in address or ">" in address:
            raise RequestError(f"invalid envelope address {address!r}")
    if not delivery.recipients:
        raise RequestError("no recipients")
    features = features or {}
    utf8_addresses = not all(a.isascii() for a in addresses)
    if utf8_addresses and "smtputf8" not in features:
        raise RequestError(
            "the envelope has non-ASCII addresses and the server does not offer SMTPUTF8"
        )
    smtputf8 = "smtputf8" in features and (
        utf8_addresses or not _header_section(delivery.body).isascii()
    )
    params = []
    if "8bitmime" in features and (smtputf8 or not delivery.body.isascii()):
        params.append("BODY=8BITMIME")
    if "size" in features:
        limit = features["size"].strip()
        if limit.isdigit() and int(limit) > 0 and len(delivery.body) > int(limit):
            raise RequestError(
                f"message of {len(delivery.body)} bytes is larger than the server's "
                f"limit of {limit} bytes"
            )
        params.append(f"SIZE={len(delivery.body)}")
    if smtputf8:
        params.append("SMTPUTF8")
    mail_arg = " ".join([f"FROM:<{delivery.mail_from}>", *params])
    return Transaction(
        mail_arg=mail_arg,
        rcpt_args=tuple((r, f"TO:<{r}>") for r in delivery.recipients),
        data=stuff(delivery.body),
        smtputf8=smtputf8,
    )


# ---------------------------------------------------------------------------- replies


@attrs.frozen
class Reply:
    code: int  # -1: not a reply smtplib could read
    text: str = ""

    @classmethod
    def of(cls, code: int, text: bytes | str) -> Reply:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return cls(code, " ".join(text.split()))

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip() if self.code >= 0 else f"bad reply {self.text!r}"


@attrs.frozen
class Transcript:
    """The replies of one transaction, as far as it went."""

    mail: Reply
    rcpts: tuple[tuple[str, Reply], ...] = ()
    data: Reply | None = None  # the DATA command's reply if not 354, else end-of-data's
    data_sent: bool = False  # the content went out: `data` answers the final "."

    @property
    def finished(self) -> bool:
        """The server's transaction state is clear (no RSET needed)."""
        return self.data_sent and self.data is not None


def queue_id(reply: Reply) -> str:
    """The queue id in a 250 reply to end-of-data, else the reply's text."""
    for pattern in _QUEUE_ID:
        m = pattern.search(reply.text)
        if m:
            return m.group(1)[:MAX_ID_LENGTH]
    return (reply.text or str(reply.code))[:MAX_ID_LENGTH]


def _listing(items: Iterable[tuple[str, Reply]]) -> str:
    return "; ".join(f"{r} ({reply})" for r, reply in items)


def classify(t: Transcript) -> Outcome:
    """The outcome of one transaction from its replies."""
    if not t.mail.ok:
        return _by_code(t.mail, f"MAIL FROM: {t.mail}")
    refused = [(r, rep) for r, rep in t.rcpts if not rep.ok]
    accepted = [r for r, rep in t.rcpts if rep.ok]
    rejected = tuple(r for r, rep in refused if rep.permanent)
    deferred = tuple(r for r, rep in refused if not rep.permanent)
    if not accepted:
        text = http.short(f"RCPT TO: every recipient refused: {_listing(refused)}")
        return Outcome.retry(text) if deferred else Outcome.permanent(text)
    if t.data is None:
        return Outcome.retry("DATA: no reply")
    if not t.data_sent or not t.data.ok:
        return _by_code(t.data, f"DATA: {t.data}")
    detail = str(t.data)
    if refused:
        parts = [detail]
        if deferred:
            parts.append(f"deferred: {_listing(x for x in refused if x[0] in deferred)}")
        if rejected:
            parts.append(f"rejected: {_listing(x for x in refused if x[0] in rejected)}")
        detail = "; ".join(parts)
    return Outcome(
        OutcomeKind.DELIVERED,
        http.short(detail),
        queue_id(t.data),
        deferred=deferred,
        rejected=rejected,
    )


def _by_code(reply: Reply, detail: str) -> Outcome:
    text = http.short(detail)
    return Outcome.permanent(text) if reply.permanent else Outcome.retry(text)


# ---------------------------------------------------------------------------- failures


class StartTlsNotOffered(smtplib.SMTPException):
    """tls = 'starttls' but the server's EHLO does not list STARTTLS."""


def connection_failure(
    exc: OSError, stage: str, settings: Settings, *, sent_data: bool = False
) -> Outcome:
    """The outcome of an exception while connecting (stage: connect, EHLO, STARTTLS,
    AUTH) or during a transaction (stage: MAIL FROM, RCPT TO, DATA)."""
    outcome = _tls_failure(exc, stage, settings) or _auth_failure(exc, stage, settings)
    if outcome is not None:
        return outcome
    return Outcome.retry(http.short(f"{settings.where}: {_problem(exc, stage, sent_data)}"))


def _tls_failure(exc: OSError, stage: str, settings: Settings) -> Outcome | None:
    where = settings.where
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome.permanent(
            f"{where}: TLS certificate verification failed "
            f"({getattr(exc, 'verify_message', None) or exc.strerror}): the "
            f"server's certificate is not trusted for {settings.host}. This is a "
            "configuration problem: set ca_file to the CA that signed it, fix the host "
            "name, or set verify_tls = false"
        )
    if isinstance(exc, StartTlsNotOffered):
        return Outcome.retry(
            f"{where}: the server does not offer STARTTLS and tls = 'starttls' requires "
            "it; nothing was sent (check the server, or use tls = 'implicit' or 'none')"
        )
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        return Outcome.retry(f"{where}: TLS handshake failed during {stage}: {reason}")
    return None


def _auth_failure(exc: OSError, stage: str, settings: Settings) -> Outcome | None:
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        reply = Reply.of(exc.smtp_code, exc.smtp_error)
        return _by_code(
            reply, f"{settings.where}: authentication as {settings.username!r} failed: {reply}"
        )
    if stage == "AUTH" and type(exc) in (smtplib.SMTPNotSupportedError, smtplib.SMTPException):
        return Outcome.permanent(
            f"{settings.where}: the server offers no AUTH mechanism this client supports "
            "(CRAM-MD5, PLAIN, LOGIN)"
        )
    return None


def _problem(exc: OSError, stage: str, sent_data: bool) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):  # greeting, HELO, STARTTLS refused
        return f"{stage}: {Reply.of(exc.smtp_code, exc.smtp_error)}"
    waiting = "waiting for the reply to the final '.' of DATA" if sent_data else f"during {stage}"
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return f"timed out {waiting}"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return f"the server closed the connection {waiting}"
    if stage == "connect":
        return f"cannot connect: {exc.strerror or exc or type(exc).__name__}"
    return f"{type(exc).__name__} during {stage}: {exc.strerror or exc}"


def redact(outcome: Outcome, secret: str | None) -> Outcome:
    """outcome with the secret (and its base64 form) cut out of the detail."""
    if not secret or not outcome.detail:
        return outcome
    detail = outcome.detail
    for form in (secret, base64.b64encode(secret.encode()).decode()):
        detail = detail.replace(form, "***")
    return outcome if detail == outcome.detail else attrs.evolve(outcome, detail=detail)


# ---------------------------------------------------------------------------- provider


@attrs.define
class _Connection:
    smtp: smtplib.SMTP
    idle_since: float
    transactions: int = 0


def _close(smtp: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        smtp.close()


def _quit(smtp: smtplib.SMTP) -> None:
    """QUIT politely but briefly, then close."""
    try:
        if smtp.sock is not None:
            smtp.sock.settimeout(QUIT_TIMEOUT)
        smtp.quit()
    except OSError:
        pass
    finally:
        _close(smtp)


class SmtpProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.settings = parse_settings(spec)
        self._password = spec.require_secret("password") if self.settings.username else None
        self._context = (
            tls_context(self.settings, spec.name) if self.settings.tls != "none" else None
        )
        self._offload = Offload(f"smtp:{spec.name}", self.settings.max_connections)
        self._helo = self.settings.helo_name  # None: smtplib's local FQDN, learnt on first use
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []  # most recently used last
        self._closed = False

    async def send(self, delivery: Delivery) -> Outcome:
        outcome = await self._offload(self._deliver, delivery)
        return redact(outcome, self._password)

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            await trio.to_thread.run_sync(_quit, conn.smtp)

    # -- the rest runs in worker threads, at most max_connections at a time

    def _deliver(self, delivery: Delivery) -> Outcome:
        conn = self._checkout()
        if isinstance(conn, Outcome):
            return conn
        smtp = conn.smtp
        try:
            txn = build_transaction(delivery, smtp.esmtp_features if smtp.does_esmtp else None)
        except RequestError as exc:
            self._checkin(conn, None)
            return Outcome.permanent(str(exc))
        stage, sent = "MAIL FROM", False
        try:
            smtp.command_encoding = "utf-8" if txn.smtputf8 else "ascii"
            mail = Reply.of(*smtp.docmd("MAIL", txn.mail_arg))
            transcript = Transcript(mail)
            if mail.ok:
                stage = "RCPT TO"
                rcpts = tuple((r, Reply.of(*smtp.docmd("RCPT", arg))) for r, arg in txn.rcpt_args)
                transcript = Transcript(mail, rcpts)
                if any(reply.ok for _, reply in rcpts):
                    stage = "DATA"
                    data = Reply.of(*smtp.docmd("DATA"))
                    if data.code == 354:
                        smtp.send(txn.data)
                        sent = True
                        data = Reply.of(*smtp.getreply())
                    transcript = Transcript(mail, rcpts, data, data_sent=sent)
        except OSError as exc:
            _close(smtp)
            return connection_failure(exc, stage, self.settings, sent_data=sent)
        finally:
            smtp.command_encoding = "ascii"
        self._checkin(conn, transcript)
        return classify(transcript)

    def _checkout(self) -> _Connection | Outcome:
        """An idle connection that still answers NOOP, else a new one."""
        while True:
            with self._lock:
                if self._closed:
                    return Outcome.retry(f"provider {self.spec.name} is shutting down")
                if not self._idle:
                    break
                conn = self._idle.pop()
            if self._usable(conn):
                return conn
        return self._open()

    def _usable(self, conn: _Connection) -> bool:
        if time.monotonic() - conn.idle_since > MAX_IDLE or conn.transactions >= MAX_TRANSACTIONS:
            _quit(conn.smtp)
            return False
        try:
            code, _ = conn.smtp.noop()
        except OSError:
            _close(conn.smtp)
            return False
        if code != 250:
            _close(conn.smtp)
            return False
        return True

    def _checkin(self, conn: _Connection, transcript: Transcript | None) -> None:
        """Back to the pool, reset if the transaction stopped half-way; or closed."""
        if transcript is not None:
            conn.transactions += 1
            replies = [transcript.mail, *(r for _, r in transcript.rcpts)]
            if transcript.data is not None:
                replies.append(transcript.data)
            if any(r.code == 421 for r in replies):  # the server is closing this connection
                _close(conn.smtp)
                return
            if not transcript.finished:
                try:
                    code, _ = conn.smtp.rset()
                except OSError:
                    _close(conn.smtp)
                    return
                if code != 250:
                    _close(conn.smtp)
                    return
        conn.idle_since = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < self.settings.max_connections:
                self._idle.append(conn)
                return
        _quit(conn.smtp)

    def _open(self) -> _Connection | Outcome:
        s = self.settings
        stage = "connect"
        smtp: smtplib.SMTP | None = None
        try:
            if s.tls == "implicit":
                smtp = smtplib.SMTP_SSL(
                    s.host, s.port, self._helo, timeout=s.timeout, context=self._context
                )
            else:
                smtp = smtplib.SMTP(s.host, s.port, self._helo, timeout=s.timeout)
            self._helo = smtp.local_hostname
            stage = "EHLO"
            smtp.ehlo_or_helo_if_needed()
            if s.tls == "starttls":
                stage = "STARTTLS"
                if not smtp.has_extn("starttls"):
                    raise StartTlsNotOffered("STARTTLS not offered")
                smtp.starttls(context=self._context)
                stage = "EHLO"
                smtp.ehlo_or_helo_if_needed()
            if s.username and self._password:
                stage = "AUTH"
                try:
                    smtp.login(s.username, self._password)
                finally:
                    smtp.password = ""  # smtplib keeps it on the object otherwise
        except OSError as exc:
            if smtp is not None:
                _close(smtp)
            return connection_failure(exc, stage, s)
        return _Connection(smtp, time.monotonic())


TYPE = ProviderType(
    name="smtp",
    max_connections=DEFAULT_MAX_CONNECTIONS,
    factory=SmtpProvider,
    settings={
        "host": SettingInfo("upstream server (or give the endpoint smtp://host:port)"),
        "port": SettingInfo("TCP port (default 587, or 465 for tls = 'implicit')"),
        "tls": SettingInfo(
            "'starttls' (default; never goes on without it), 'implicit' (SMTPS) or 'none'"
        ),
        "verify_tls": SettingInfo("verify the server's certificate and name (default true)"),
        "ca_file": SettingInfo("PEM file of CA certificates to trust instead of the system's"),
        "username": SettingInfo("AUTH user name (the secret is the password)"),
        "allow_plaintext_auth": SettingInfo(
            "allow AUTH with tls = 'none' (default false: the password would be in clear)"
        ),
        "helo_name": SettingInfo("name sent in EHLO (default: this host's name)"),
        "timeout": SettingInfo("seconds to wait for each connect, reply or write (default 30)"),
        "max_connections": SettingInfo("connections kept open and used at once (default 4)"),
    },
    secret="password",  # noqa: S106 - names what the secret is, not a secret
    secret_required=False,
    max_recipients=MAX_RECIPIENTS,
)
