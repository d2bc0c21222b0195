"""`smtpproxy send-test`: the operator's SMTP client for checking a deployment.

It speaks SMTP to any server (this relay or another) with smtplib, prints every reply and
where the time went, and for --count > 1 sums the run up. Blocking I/O is fine here: the
CLI is not trio. The pure parts (message, replies, summary) are in smtpproxy.ops.sendtest;
the options are smtpproxy.cli.send_test, which imports this module when the command runs.
"""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from email.utils import formatdate
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import typer
from rich.text import Text

from smtpproxy.cli.common import config, console, read_secret
from smtpproxy.cli.send_test import SMTPPROXY_PORT, SMTPS_PORT, AuthMechanism, TlsMode
from smtpproxy.errors import UsageError
from smtpproxy.ops.sendtest import (
    Outcome,
    Summary,
    build_message,
    envelope_address,
    ms,
    queued_as,
    reply_lines,
    summarize,
    summary_lines,
    wire_data,
)

if TYPE_CHECKING:
    from smtpproxy.config import Config

HIDDEN = "********"

Line = Callable[[str, str], None]  # (kind, text): kind "C" sent, "S" received, "*" note


@attrs.frozen
class Target:
    host: str
    port: int
    tls: TlsMode
    context: ssl.SSLContext | None
    verified: bool
    timeout: float
    ehlo_name: str
    user: str | None
    password: str | None = attrs.field(repr=False)
    mechanism: AuthMechanism
    sender: str  # envelope MAIL FROM
    recipients: tuple[str, ...]  # envelope RCPT TO

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class SessionError(Exception):
    """The session broke without an SMTP reply to show for it (connection, TLS, timeout).
    fatal: every further message would fail the same way, so the run stops."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class _Client(smtplib.SMTP):
    """smtplib.SMTP that reports each command and reply line, hides credentials, and
    times the TCP connect and an implicit-TLS handshake separately."""

    def __init__(self, target: Target, on_line: Line) -> None:
        self._target = target
        self._on_line = on_line
        self._shown: str | None = None
        self.handshake_seconds = 0.0
        super().__init__(local_hostname=target.ehlo_name, timeout=target.timeout)
        self._host = target.host  # starttls() checks the certificate against it

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.create_connection((host, port), timeout, self.source_address)
        if self._target.tls is not TlsMode.implicit:
            return sock
        assert self._target.context is not None
        started = time.perf_counter()
        try:
            tls = self._target.context.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.handshake_seconds = time.perf_counter() - started
        return tls

    def note(self, text: str, kind: str = "*") -> None:
        self._on_line(kind, text)

    def command(self, line: str, shown: str) -> tuple[int, bytes]:
        """Send a line verbatim (an AUTH exchange), showing `shown` in its place."""
        self._shown = shown
        return self.docmd(line)

    def putcmd(self, cmd: str, args: str = "") -> None:
        if self._shown is not None:
            shown, self._shown = self._shown, None
        else:
            cmd = cmd.upper()  # smtplib sends "ehlo", "mail", "rcpt", "quit"
            shown = f"{cmd} {args}" if args else cmd
        self._on_line("C", shown)
        super().putcmd(cmd, args)

    def getreply(self) -> tuple[int, bytes]:
        code, text = super().getreply()
        for line in reply_lines(code, text.decode("utf-8", "replace")):
            self._on_line("S", line)
        return code, text


class _Refused(Exception):
    """The server answered with something other than what the step needed."""


def _expect(outcome: Outcome, reply: tuple[int, bytes], *wanted: int) -> None:
    code, text = reply
    if code not in wanted:
        outcome.code = code
        outcome.reply = text.decode("utf-8", "replace").replace("\n", " ")
        raise _Refused


def _authenticate(client: _Client, target: Target) -> tuple[int, bytes]:
    """AUTH PLAIN (initial response) or LOGIN (two 334 prompts); credentials in UTF-8,
    never shown."""
    assert target.user is not None and target.password is not None

    def b64(value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    user, password = target.user.encode(), target.password.encode()
    if target.mechanism is AuthMechanism.plain:
        blob = b64(b"\0" + user + b"\0" + password)
        return client.command(f"AUTH PLAIN {blob}", f"AUTH PLAIN {HIDDEN}")
    code, text = client.command("AUTH LOGIN", "AUTH LOGIN")
    if code != 334:
        return code, text
    code, text = client.command(b64(user), f"{b64(user)}  (username {target.user})")
    if code != 334:
        return code, text
    code, text = client.command(b64(password), HIDDEN)
    if code == 334:  # a server that keeps asking: cancel the exchange (RFC 4954)
        code, text = client.command("*", "*")
    return code, text


def _tls_info(sock: object, verified: bool) -> dict[str, object]:
    assert isinstance(sock, ssl.SSLSocket)
    cipher = sock.cipher()
    return {
        "version": sock.version(),
        "cipher": cipher[0] if cipher else None,
        "verified": verified,
    }


def _tls_note(info: dict[str, object]) -> str:
    check = "certificate verified" if info["verified"] else "certificate NOT verified (--insecure)"
    return f"TLS {info['version']} {info['cipher']}, {check}"


def _session(client: _Client, target: Target, outcome: Outcome, data: bytes) -> None:
    """One transaction on a new client. Raises _Refused at the first reply that is not
    the one the step needs (the outcome holds it); a 250 for DATA ends it as DONE."""
    started = time.perf_counter()
    greeting = client.connect(target.host, target.port)
    outcome.timings["connect"] = time.perf_counter() - started - client.handshake_seconds
    if target.tls is TlsMode.implicit:
        outcome.timings["tls"] = client.handshake_seconds
        outcome.tls = _tls_info(client.sock, target.verified)
        client.note(_tls_note(outcome.tls))
    _expect(outcome, greeting, 220)
    outcome.stage = "EHLO"
    _expect(outcome, client.ehlo(), 250)
    if target.tls is TlsMode.starttls:
        outcome.stage = "TLS"
        if not client.has_extn("starttls"):
            raise SessionError(
                f"{target.address} does not offer STARTTLS: use --tls implicit for an "
                "SMTPS port, or --tls none to send in plain text",
                fatal=True,
            )
        tls_started = time.perf_counter()
        _expect(outcome, client.starttls(context=target.context), 220)
        outcome.timings["tls"] = time.perf_counter() - tls_started
        outcome.tls = _tls_info(client.sock, target.verified)
        client.note(_tls_note(outcome.tls))
        outcome.stage = "EHLO"
        _expect(outcome, client.ehlo(), 250)
    if target.user is not None:
        if target.tls is TlsMode.none:
            client.note("AUTH without TLS: the password crosses the network in the clear")
        outcome.stage = "AUTH"
        auth_started = time.perf_counter()
        reply = _authenticate(client, target)
        outcome.timings["auth"] = time.perf_counter() - auth_started
        _expect(outcome, reply, 235)
    outcome.stage = "MAIL"
    _expect(outcome, client.mail(target.sender), 250)
    outcome.stage = "RCPT"
    for recipient in target.recipients:
        _expect(outcome, client.rcpt(recipient), 250, 251)
    outcome.stage = "DATA"
    data_started = time.perf_counter()
    _expect(outcome, client.docmd("DATA"), 354)
    client.note(f"<message: {len(data)} bytes, Message-ID {outcome.message_id}>", kind="C")
    client.note(".", kind="C")
    client.send(wire_data(data))
    reply = client.getreply()
    outcome.timings["data"] = time.perf_counter() - data_started
    _expect(outcome, reply, 250)
    outcome.code, outcome.reply = 250, reply[1].decode("utf-8", "replace").replace("\n", " ")
    outcome.stage = "DONE"
    outcome.queued_as = queued_as(outcome.reply)


def _tls_error(exc: ssl.SSLError, target: Target) -> SessionError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "verification failed"
        return SessionError(
            f"the TLS certificate of {target.address} could not be verified ({reason}): "
            "pass --ca-file with its CA certificate, or --insecure to skip verification "
            "(for testing only)",
            fatal=True,
        )
    hint = ""
    if target.tls is TlsMode.implicit:
        hint = " (if the port speaks plain SMTP first, use --tls starttls)"
    reason = exc.reason or str(exc)
    return SessionError(f"TLS handshake with {target.address} failed: {reason}{hint}", fatal=True)


def _session_error(exc: OSError | smtplib.SMTPException, target: Target) -> SessionError:
    """A library exception as one line that says what to do about it."""
    where = target.address
    if isinstance(exc, ssl.SSLError):
        return _tls_error(exc, target)
    if isinstance(exc, smtplib.SMTPServerDisconnected) and isinstance(
        exc.__context__, TimeoutError
    ):
        exc = exc.__context__  # smtplib reports a read timeout as a disconnect
    if isinstance(exc, socket.gaierror):
        return SessionError(f"cannot resolve {target.host}: {exc.strerror}", fatal=True)
    known: tuple[tuple[type[BaseException], str], ...] = (
        (smtplib.SMTPServerDisconnected, f"{where} closed the connection"),
        (TimeoutError, f"no answer from {where} within {target.timeout:g} s"),
        (ConnectionRefusedError, f"cannot connect to {where}: connection refused"),
        (smtplib.SMTPException, f"SMTP error from {where}: {exc}"),
    )
    for kind, message in known:
        if isinstance(exc, kind):
            return SessionError(message)
    strerror = exc.strerror if isinstance(exc, OSError) else None
    return SessionError(f"connection to {where} failed: {strerror or exc}")


def deliver(target: Target, outcome: Outcome, data: bytes, on_line: Line) -> Outcome:
    """One message in its own session: connect, TLS, AUTH, MAIL, RCPT, DATA, QUIT.
    Raises SessionError when the session broke without a reply."""
    client = _Client(target, on_line)
    started = time.perf_counter()
    try:
        _session(client, target, outcome, data)
    except _Refused:
        pass
    except (OSError, smtplib.SMTPException) as exc:  # ssl.SSLError is an OSError
        client.close()  # no QUIT: the connection is broken or silent
        raise _session_error(exc, target) from None
    except BaseException:
        client.close()
        raise
    finally:
        outcome.timings["total"] = time.perf_counter() - started
    if client.sock is not None:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()
    return outcome


def _style(kind: str, text: str) -> str:
    if kind == "C":
        return "cyan"
    if kind == "S":
        return "red" if text[:1] in {"4", "5"} else "green"
    return "dim"


def _show(kind: str, text: str) -> None:
    line = f"{kind}: {text}" if kind in {"C", "S"} else f"* {text}"
    console.print(Text(line, style=_style(kind, text)), soft_wrap=True, highlight=False)


def _quiet(kind: str, text: str) -> None:
    del kind, text


def _timing_line(outcome: Outcome) -> str:
    names = (("connect", "connect"), ("tls", "TLS"), ("auth", "AUTH"), ("data", "DATA-to-250"))
    parts = [
        f"{label} {ms(outcome.timings[key])}" for key, label in names if key in outcome.timings
    ]
    parts.append(f"total {ms(outcome.total)}")
    return "timing: " + ", ".join(parts)


def _progress_line(outcome: Outcome, count: int) -> str:
    width = len(str(count))
    head = f"[{outcome.number:>{width}}/{count}]"
    if outcome.accepted:
        return f"{head} 250 {outcome.reply} ({ms(outcome.total)})"
    return f"{head} not accepted: {outcome.why()}"


def _read_attachments(paths: Sequence[Path]) -> list[tuple[str, bytes]]:
    out = []
    for path in paths:
        try:
            out.append((path.name, path.read_bytes()))
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot read {path}: {exc.strerror or exc}", param_hint="--attach"
            ) from None
    return out


def _client_context(insecure: bool, ca_file: Path | None) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise typer.BadParameter(
            f"cannot load {ca_file}: {getattr(exc, 'strerror', None) or exc}",
            param_hint="--ca-file",
        ) from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _address(value: str, option: str) -> str:
    addr = envelope_address(value)
    if addr is None:
        raise typer.BadParameter(f"{value!r} is not an email address", param_hint=option)
    if not addr.isascii():
        raise typer.BadParameter(
            f"{value!r}: send-test sends ASCII addresses only", param_hint=option
        )
    return addr


def _password(user: str | None, password_stdin: bool) -> str | None:
    if user is None:
        if password_stdin:
            raise typer.BadParameter(
                "there is no --user to read a password for", param_hint="--password-stdin"
            )
        return None
    if not password_stdin and not sys.stdin.isatty():
        raise typer.BadParameter(
            "the password comes on standard input: add --password-stdin "
            "(a password is never taken from the command line)",
            param_hint="--user",
        )
    return read_secret("Password")


@attrs.define
class Run:
    outcomes: list[Outcome] = attrs.Factory(list)
    elapsed: float = 0.0
    stopped: str | None = None  # why the run ended before --count: a fatal error
    interrupted: bool = False  # Ctrl-C


def _run(
    target: Target,
    count: int,
    rate: float | None,
    make: Callable[[int], tuple[bytes, str]],
    as_json: bool,
) -> Run:
    """Send count messages, each started no sooner than rate allows. A session error on
    the first message, or one every later message would repeat (TLS), is raised as one
    error line when nothing was sent yet, and otherwise ends the run early."""
    single = count == 1
    on_line: Line = _show if single and not as_json else _quiet
    run = Run()
    started = time.perf_counter()
    try:
        for number in range(1, count + 1):
            if rate is not None:
                delay = started + (number - 1) / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            data, message_id = make(number)
            outcome = Outcome(number, message_id=message_id)
            if single and not as_json:
                _show("*", f"connecting to {target.address} (TLS: {target.tls.value})")
            try:
                deliver(target, outcome, data, on_line)
            except SessionError as exc:
                if number == 1:
                    raise UsageError(str(exc)) from None
                outcome.error = str(exc)
                if exc.fatal:
                    run.stopped = str(exc)
            run.outcomes.append(outcome)
            if not single and not as_json:
                say_styled(_progress_line(outcome, count), outcome.accepted)
            if run.stopped:
                break
    except KeyboardInterrupt:
        run.interrupted = True
    run.elapsed = time.perf_counter() - started
    return run


def _report(run: Run, target: Target, count: int, as_json: bool) -> Summary:
    summary = summarize(run.outcomes, run.elapsed)
    if as_json:
        result = {
            "host": target.host,
            "port": target.port,
            "tls": target.tls.value,
            "count": count,
            "stopped": run.stopped or ("interrupted" if run.interrupted else None),
            **summary.as_dict(),
            "messages": [o.as_dict() for o in run.outcomes],
        }
        print(json.dumps(result, indent=2))
        return summary
    if count == 1 and run.outcomes:
        [outcome] = run.outcomes
        console.print(_timing_line(outcome), markup=False, highlight=False, soft_wrap=True)
        if outcome.accepted:
            say_styled(f"accepted: 250 {outcome.reply}", True)
        else:
            say_styled(f"not accepted: {outcome.why()}", False)
        return summary
    if run.interrupted or run.stopped:
        why = "interrupted" if run.interrupted else "stopped"
        say_styled(f"{why} after {len(run.outcomes)} of {count} messages", False)
    for line in summary_lines(summary, run.outcomes):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    return summary


def say_styled(line: str, good: bool) -> None:
    console.print(Text(line, style="green" if good else "red"), soft_wrap=True, highlight=False)


def _check_options(
    *,
    rate: float | None,
    timeout: float,
    auth: AuthMechanism | None,
    user: str | None,
    tls: TlsMode,
    verify_options: bool,
) -> None:
    if rate is not None and not rate > 0:
        raise typer.BadParameter("must be more than 0", param_hint="--rate")
    if not timeout > 0:
        raise typer.BadParameter("must be more than 0", param_hint="--timeout")
    if auth is not None and user is None:
        raise typer.BadParameter("AUTH needs --user", param_hint="--auth")
    if tls is TlsMode.none and verify_options:
        raise typer.BadParameter(
            "none makes no TLS connection, so --insecure and --ca-file do not apply",
            param_hint="--tls",
        )


def _own_listener(cfg: Config, tls: TlsMode, port: int | None) -> tuple[str, int | None]:
    """Where this configuration's smtpproxy listens: (host, port), the port given on the
    command line winning. A listener on every address is reached on loopback."""
    listeners = cfg.smtp.tls_listen if tls is TlsMode.implicit else cfg.smtp.listen
    if not listeners:
        return "127.0.0.1", port
    first = listeners[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(first.host, first.host)  # noqa: S104
    return host, port or first.port


def send_test(
    ctx: typer.Context,
    *,
    sender: str,
    to: list[str],
    host: str | None,
    port: int | None,
    tls: TlsMode,
    insecure: bool,
    ca_file: Path | None,
    user: str | None,
    password_stdin: bool,
    auth: AuthMechanism | None,
    subject: str,
    body: str | None,
    html: str | None,
    attach: list[Path] | None,
    count: int,
    rate: float | None,
    timeout: float,
    as_json: bool,
) -> None:
    """`smtpproxy send-test` once its options are parsed (smtpproxy.cli.send_test)."""
    _check_options(
        rate=rate,
        timeout=timeout,
        auth=auth,
        user=user,
        tls=tls,
        verify_options=insecure or ca_file is not None,
    )
    envelope_from = _address(sender, "--from")
    recipients = tuple(_address(r, "--to") for r in to)
    attachments = _read_attachments(attach or [])
    password = _password(user, password_stdin)
    if host is None:
        host, port = _own_listener(config(ctx), tls, port)
    target = Target(
        host=host,
        port=port or (SMTPS_PORT if tls is TlsMode.implicit else SMTPPROXY_PORT),
        tls=tls,
        context=None if tls is TlsMode.none else _client_context(insecure, ca_file),
        verified=not insecure,
        timeout=timeout,
        ehlo_name=socket.gethostname() or "localhost",
        user=user,
        password=password,
        mechanism=auth or AuthMechanism.plain,
        sender=envelope_from,
        recipients=recipients,
    )
    text = body
    if text is None:
        when = formatdate(localtime=True)
        text = f"A test message from smtpproxy send-test on {target.ehlo_name}, {when}.\n"

    def make(number: int) -> tuple[bytes, str]:
        message = build_message(
            sender=sender,
            recipients=to,
            subject=subject if count == 1 else f"{subject} [{number}/{count}]",
            text=text,
            html=html,
            attachments=attachments,
        )
        return message.as_bytes(), str(message["Message-ID"])

    run = _run(target, count, rate, make, as_json)
    summary = _report(run, target, count, as_json)
    if run.interrupted:
        raise typer.Exit(130)
    if not summary.ok or run.stopped:
        raise typer.Exit(1)
