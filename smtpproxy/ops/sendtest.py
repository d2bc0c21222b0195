"""The pure parts of `smtpproxy send-test`: building a test message, reading SMTP replies,
and summing up a run (accepted, refused by code, msgs/s, latency percentiles). Pure: no
sockets, no clock, no files; the command does the I/O and hands the results here."""

from __future__ import annotations

import math
import mimetypes
import re
from collections import Counter
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any

import attrs

_QUEUED = re.compile(r"queued as (\S+)", re.IGNORECASE)
_LINE_START_DOT = re.compile(rb"(?m)^\.")


def envelope_address(value: str) -> str | None:
    """The addr-spec of 'Name <user@domain>' or 'user@domain'; None if it is not one."""
    _, addr = parseaddr(value)
    local, at, domain = addr.rpartition("@")
    if not (at and local and domain) or any(c.isspace() for c in addr):
        return None
    return addr


def attachment_type(filename: str) -> tuple[str, str]:
    """(maintype, subtype) guessed from the file name; octet-stream when unknown or
    compressed (a .tar.gz is not a tar file to the recipient)."""
    ctype, encoding = mimetypes.guess_type(filename, strict=False)
    if ctype is None or encoding is not None or "/" not in ctype:
        return "application", "octet-stream"
    maintype, subtype = ctype.split("/", 1)
    return maintype, subtype


def build_message(
    *,
    sender: str,
    recipients: Sequence[str],
    subject: str,
    text: str,
    html: str | None = None,
    attachments: Sequence[tuple[str, bytes]] = (),
    timestamp: float | None = None,
) -> EmailMessage:
    """A message with a Date and a fresh Message-ID (so a repeat is never taken for a
    resubmission): text, the HTML as an alternative, then the attachments as they are
    (base64, so their bytes arrive intact whatever the type)."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Date"] = formatdate(timestamp, localtime=True)
    domain = (envelope_address(sender) or "send-test.invalid").rpartition("@")[2]
    msg["Message-ID"] = make_msgid(idstring="send-test", domain=domain)
    msg["X-Mailer"] = "smtpproxy send-test"
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    for filename, data in attachments:
        maintype, subtype = attachment_type(filename)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg


def wire_data(message: bytes) -> bytes:
    """The DATA payload: dot-stuffed, ending in CRLF . CRLF (RFC 5321 4.5.2)."""
    data = _LINE_START_DOT.sub(b"..", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


def reply_lines(code: int, text: str) -> list[str]:
    """A multi-line reply as it was on the wire: '250-first', ..., '250 last'."""
    parts = text.splitlines() or [""]
    return [
        f"{code}{' ' if i == len(parts) - 1 else '-'}{part}".rstrip()
        for i, part in enumerate(parts)
    ]


def queued_as(reply: str) -> str | None:
    """The message id from a '250 ... queued as ID' reply, if it names one."""
    m = _QUEUED.search(reply)
    return m.group(1) if m else None


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@attrs.define
class Outcome:
    """What happened to one message. code is the reply that ended it (250 after DATA when
    accepted); error is set instead when the session broke without a reply."""

    number: int
    stage: str = "CONNECT"  # CONNECT, TLS, EHLO, AUTH, MAIL, RCPT, DATA, DONE
    code: int | None = None
    reply: str = ""
    error: str | None = None
    queued_as: str | None = None
    message_id: str = ""
    tls: dict[str, Any] | None = None
    timings: dict[str, float] = attrs.Factory(dict)  # seconds: connect, tls, auth, data

    @property
    def accepted(self) -> bool:
        return self.stage == "DONE" and self.code == 250

    @property
    def total(self) -> float:
        return self.timings.get("total", 0.0)

    def why(self) -> str:
        """One phrase for a message that was not accepted."""
        if self.error is not None:
            return f"{self.error} (at {self.stage})"
        return f"{self.code} {self.reply} (at {self.stage})".replace("\n", " ")

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "accepted": self.accepted,
            "stage": self.stage,
            "code": self.code,
            "reply": self.reply,
            "error": self.error,
            "queued_as": self.queued_as,
            "message_id": self.message_id,
            "tls": self.tls,
            "timing_ms": {k: round(v * 1000, 2) for k, v in self.timings.items()},
        }


@attrs.frozen
class Summary:
    sent: int
    accepted: int
    refused: dict[str, int]  # reply code -> messages
    errors: dict[str, int]  # session error without a reply -> messages
    elapsed: float
    latency: dict[str, float] | None  # seconds: p50, p95, max over accepted messages

    @property
    def ok(self) -> bool:
        return self.sent > 0 and self.accepted == self.sent

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "sent": self.sent,
            "accepted": self.accepted,
            "refused": self.refused,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed, 3),
            "msgs_per_s": round(self.rate, 2),
            "latency_ms": (
                {k: round(v * 1000, 2) for k, v in self.latency.items()} if self.latency else None
            ),
        }


def summarize(outcomes: Sequence[Outcome], elapsed: float) -> Summary:
    refused: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for o in outcomes:
        if o.accepted:
            continue
        if o.code is not None:
            refused[str(o.code)] += 1
        else:
            errors[o.error or "unknown error"] += 1
    totals = [o.total for o in outcomes if o.accepted]
    latency = (
        {"p50": percentile(totals, 50), "p95": percentile(totals, 95), "max": max(totals)}
        if totals
        else None
    )
    return Summary(
        sent=len(outcomes),
        accepted=sum(o.accepted for o in outcomes),
        refused=dict(sorted(refused.items())),
        errors=dict(errors.most_common()),
        elapsed=elapsed,
        latency=latency,
    )


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def summary_lines(summary: Summary, outcomes: Sequence[Outcome]) -> list[str]:
    """The human summary of a run: counts, throughput, latency, and why any failed."""
    lines = [
        f"sent {summary.sent} in {summary.elapsed:.2f} s ({summary.rate:.1f} msgs/s): "
        f"{summary.accepted} accepted, {summary.sent - summary.accepted} not accepted"
    ]
    if summary.latency:
        lat = summary.latency
        lines.append(
            f"latency (connect to 250, accepted messages): p50 {ms(lat['p50'])}, "
            f"p95 {ms(lat['p95'])}, max {ms(lat['max'])}"
        )
    for code, count in summary.refused.items():
        example = next(o for o in outcomes if not o.accepted and str(o.code) == code)
        lines.append(f"refused {count} x {code} at {example.stage}: {example.reply}")
    for error, count in summary.errors.items():
        example = next(o for o in outcomes if o.code is None and o.error == error)
        lines.append(f"failed {count} x: {example.why()}")
    return lines
