"""`smtpproxy send-test`: its options. The command itself (smtplib, TLS, the report) is
smtpproxy.cli.send_test_client, imported when the command runs: `smtpproxy --help` does not pay
for it."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from smtpproxy.cli.common import JsonOption

SMTPPROXY_PORT = 2525  # smtpproxy's default smtp.listen
SMTPS_PORT = 465
DEFAULT_SUBJECT = "smtpproxy send-test"


class TlsMode(StrEnum):
    starttls = "starttls"
    implicit = "implicit"
    none = "none"


class AuthMechanism(StrEnum):
    plain = "plain"
    login = "login"


def register(app: typer.Typer) -> None:
    @app.command("send-test")
    def send_test(
        ctx: typer.Context,
        sender: str = typer.Option(
            ..., "--from", metavar="ADDRESS", help="Sender (MAIL FROM and From:)."
        ),
        to: list[str] = typer.Option(
            ..., "--to", metavar="ADDRESS", help="Recipient; repeat for more."
        ),
        host: str | None = typer.Option(
            None,
            "--host",
            help="Server to connect to \\[default: this smtpproxy's first smtp.listen "
            "address, or smtp.tls_listen with --tls implicit].",
            show_default=False,
        ),
        port: int | None = typer.Option(
            None,
            "--port",
            min=1,
            max=65535,
            help="Server port \\[default: the smtp.listen port without --host; with --host "
            f"{SMTPPROXY_PORT}, {SMTPS_PORT} with --tls implicit].",
            show_default=False,
        ),
        tls: TlsMode = typer.Option(
            TlsMode.starttls,
            "--tls",
            help="starttls: upgrade after EHLO; implicit: TLS from the first byte (SMTPS); "
            "none: plain text.",
        ),
        insecure: bool = typer.Option(
            False, "--insecure", help="Do not verify the server certificate (testing only)."
        ),
        ca_file: Path | None = typer.Option(
            None,
            "--ca-file",
            exists=True,
            dir_okay=False,
            metavar="PEM",
            help="Trust this CA (or self-signed) certificate instead of the system's.",
        ),
        user: str | None = typer.Option(
            None, "--user", help="Authenticate as this user (no AUTH without it)."
        ),
        password_stdin: bool = typer.Option(
            False, "--password-stdin", help="Read the --user password from standard input."
        ),
        auth: AuthMechanism | None = typer.Option(
            None, "--auth", help="AUTH mechanism \\[default: plain]."
        ),
        subject: str = typer.Option(DEFAULT_SUBJECT, "--subject"),
        body: str | None = typer.Option(
            None, "--body", help="Text body \\[default: a line saying from where and when]."
        ),
        html: str | None = typer.Option(
            None, "--html", help="An HTML body, sent as an alternative to the text."
        ),
        attach: list[Path] | None = typer.Option(
            None,
            "--attach",
            exists=True,
            dir_okay=False,
            metavar="FILE",
            help="Attach a file (content type guessed from its name); repeat for more.",
        ),
        count: int = typer.Option(
            1, "--count", min=1, help="Messages to send, each in its own session."
        ),
        rate: float | None = typer.Option(
            None, "--rate", metavar="MSGS/S", help="Start at most this many messages a second."
        ),
        timeout: float = typer.Option(
            30.0, "--timeout", metavar="SECONDS", help="Give up on a silent server after this."
        ),
        as_json: bool = JsonOption,
    ) -> None:
        """Send test messages through an SMTP server and show how it went.

        One message: every command and reply, then the time spent connecting, on TLS,
        on AUTH and from DATA to the 250. More (--count): a line per message, then a
        summary: sent, accepted, refused by reply code, msgs/s, latency p50/p95/max.

        Exit status: 0 when every message got a 250, 1 otherwise (the output says why),
        2 for a usage error. The password is read from standard input, never the
        command line, and never shown.

        Examples:

        [bold]echo "$PW" | smtpproxy send-test --user app --password-stdin --from me@example.com --to you@example.org[/bold]

        [bold]smtpproxy send-test --host mail.example.com --port 587 --user app --password-stdin --auth login --from me@example.com --to you@example.org --html '<p>Hi</p>' --attach report.pdf < pw.txt[/bold]

        [bold]smtpproxy send-test --insecure --user app --password-stdin --from me@example.com --to you@example.org --count 200 --rate 20 --json < pw.txt[/bold]
        """  # noqa: E501
        from smtpproxy.cli import send_test_client

        send_test_client.send_test(
            ctx,
            sender=sender,
            to=to,
            host=host,
            port=port,
            tls=tls,
            insecure=insecure,
            ca_file=ca_file,
            user=user,
            password_stdin=password_stdin,
            auth=auth,
            subject=subject,
            body=body,
            html=html,
            attach=attach,
            count=count,
            rate=rate,
            timeout=timeout,
            as_json=as_json,
        )
