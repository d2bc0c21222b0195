"""A local SMTP server for the smtp provider's tests: stock aiosmtpd 1.4.6 on its own
asyncio loop in a daemon thread (aiosmtpd's Controller cannot be driven from trio).

    with FakeSmtp(tmp_path, credentials=("user", "secret")) as server:
        ...  # connect to 127.0.0.1:server.port (STARTTLS) or server.tls_port (SMTPS)
        assert server.received[0].content == body

What it offers:
  - a listener on 127.0.0.1 (free port) with STARTTLS when `starttls` (a self-signed
    certificate made with `cryptography` for localhost and 127.0.0.1, or `cert_names`;
    its PEM file, `cert_file`, is the CA file that trusts it), and when `implicit_tls`
    a second listener that speaks TLS from the first byte (`tls_port`);
  - AUTH PLAIN and LOGIN (aiosmtpd's built-in mechanisms; `mechanisms` narrows them),
    checked against `credentials`, only over TLS (auth_require_tls); every attempt is
    recorded in `auth_attempts`;
  - `received`: every accepted message with its exact envelope (MAIL FROM and its
    parameters, the accepted RCPT TO addresses), its exact content (aiosmtpd's
    original_content: the bytes after dot-unstuffing) and the session's facts;
  - `script`: replies to give instead of accepting (per recipient, to MAIL, to the end
    of DATA) and commands at which to hang (never answer);
  - `connections`: how many TCP connections it accepted; `drop_connections()` closes
    every open one from the server side (as a server's idle timeout would).

`silent_server()` is a listening socket that never answers (the kernel completes the
TCP handshake, nobody reads); tests/support/net.py's `closed_port()` is a port where
nothing listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.lifecycle import Closing

HOST = "127.0.0.1"
HOSTNAME = "fake-smtp.test"


def make_certificate(
    directory: Path, names: tuple[str, ...] = ("localhost", HOST)
) -> tuple[Path, Path]:
    """A self-signed P-256 certificate (its own CA) for names (host names or IPs)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fake-smtp.crt", directory / "fake-smtp.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    content: bytes
    helo: str | None
    tls: bool
    login: str | None  # the authenticated user, None without AUTH
    connection: int  # 1-based number of the TCP connection it came in on


@dataclass
class Script:
    """How the server answers; change it between deliveries."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> "550 5.1.1 ..."
    mail_reply: str | None = None  # e.g. "451 4.3.0 try later"
    data_reply: str | None = None  # the reply to the end of DATA instead of 250
    hang: set[str] = field(default_factory=set)  # "MAIL", "RCPT", "DATA": never answer


class _Handler:
    def __init__(self, server: FakeSmtp) -> None:
        self.server = server

    async def _maybe_hang(self, command: str) -> None:
        if command in self.server.script.hang:
            await asyncio.Event().wait()  # cancelled when the server closes

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await self._maybe_hang("MAIL")
        if self.server.script.mail_reply:
            return self.server.script.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        await self._maybe_hang("RCPT")
        reply = self.server.script.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self._maybe_hang("DATA")
        if self.server.script.data_reply:
            return self.server.script.data_reply
        assert envelope.mail_from is not None
        assert envelope.original_content is not None
        transport = server.transport
        auth = session.auth_data
        self.server.received.append(
            Received(
                mail_from=envelope.mail_from,
                mail_options=list(envelope.mail_options),
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content,
                helo=session.host_name,
                tls=transport is not None and transport.get_extra_info("ssl_object") is not None,
                login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
                connection=self.server.connection_numbers[id(server)],
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.server.received):04d}"


class FakeSmtp(Closing):
    def __init__(
        self,
        directory: Path,
        *,
        starttls: bool = True,
        implicit_tls: bool = False,
        credentials: tuple[str, str] | None = None,
        mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
        smtputf8: bool = True,
        data_size_limit: int = 10 * 1024 * 1024,
        cert_names: tuple[str, ...] = ("localhost", HOST),
    ) -> None:
        self.cert_file, self.key_file = make_certificate(directory, cert_names)
        self.credentials = credentials
        self.script = Script()
        self.received: list[Received] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []  # (mechanism, login, accepted)
        self.connections = 0
        self.connection_numbers: dict[int, int] = {}
        self.port = 0
        self.tls_port = 0
        self._starttls = starttls
        self._implicit = implicit_tls
        self._exclude = [m for m in ("PLAIN", "LOGIN") if m not in mechanisms]
        self._smtputf8 = smtputf8
        self._size = data_size_limit
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(self.cert_file, self.key_file)
        self._protocols: list[SMTP] = []
        self._servers: list[asyncio.Server] = []
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="fake-smtp", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake SMTP server did not start")
        if self._error is not None:
            raise self._error

    # -- the server's thread

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and self.credentials is not None
            and (data.login.decode(), data.password.decode()) == self.credentials
        )
        login = data.login.decode() if isinstance(data, LoginPassword) else ""
        self.auth_attempts.append((mechanism, login, ok))
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    def _protocol(self, implicit: bool) -> SMTP:
        protocol = SMTP(
            _Handler(self),
            hostname=HOSTNAME,
            tls_context=self._context if self._starttls and not implicit else None,
            # on the SMTPS listener the whole session is TLS, which aiosmtpd cannot see
            auth_require_tls=not implicit,
            authenticator=self._authenticate,
            auth_exclude_mechanism=self._exclude,
            enable_SMTPUTF8=self._smtputf8,
            data_size_limit=self._size,
            loop=self.loop,
        )
        self.connections += 1
        self.connection_numbers[id(protocol)] = self.connections
        self._protocols.append(protocol)
        return protocol

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            plain = self.loop.run_until_complete(
                self.loop.create_server(lambda: self._protocol(False), HOST, 0)
            )
            self._servers.append(plain)
            self.port = plain.sockets[0].getsockname()[1]
            if self._implicit:
                tls = self.loop.run_until_complete(
                    self.loop.create_server(
                        lambda: self._protocol(True), HOST, 0, ssl=self._context
                    )
                )
                self._servers.append(tls)
                self.tls_port = tls.sockets[0].getsockname()[1]
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            self.loop.close()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._shutdown())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def _close_transports(self) -> None:
        for protocol in self._protocols:
            for transport in (protocol.transport, protocol._original_transport):
                if transport is not None and not transport.is_closing():
                    transport.close()

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        self._close_transports()
        tasks = [t for t in asyncio.all_tasks(self.loop) if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        await asyncio.sleep(0.05)  # let the transports' close callbacks run

    # -- the test's side

    def drop_connections(self) -> None:
        """Close every open connection from the server's side, and wait until done."""
        done = threading.Event()

        def drop() -> None:
            self._close_transports()
            self.loop.call_later(0.05, done.set)

        self.loop.call_soon_threadsafe(drop)
        assert done.wait(10)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        sock.listen(16)
        yield sock.getsockname()[1]
