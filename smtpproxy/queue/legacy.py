"""Legacy stream entries: the original system's format, delivered during the migration.

The original design put whole messages on the stream: fields `from`, `to` (a JSON list
or a comma/space separated string), `subject`, `body` (base64 of the message or of its
text), and sometimes `account_id`/`tenant_id`. Such an entry is adopted: its body goes
to the message store and a normal `queued` row is written (idempotently: the id is
derived from the entry id, so a crash mid-adoption does not make two), after which it
is delivered like any other message. Entries without an account use redis.legacy_account.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import json
import re
from collections.abc import Mapping
from email.message import EmailMessage
from email.policy import SMTP

import attrs


class LegacyEntryError(ValueError):
    """The entry cannot be turned into a message (named field missing or malformed)."""


@attrs.frozen
class LegacyMessage:
    mail_from: str
    rcpt_to: tuple[str, ...]
    body: bytes = attrs.field(repr=False)
    account_id: int | None = None


def is_legacy(fields: Mapping[str, str]) -> bool:
    return "id" not in fields and "body" in fields


def message_id_for(stream: str, entry_id: str) -> str:
    """A stable 26-character id for a legacy entry (the same entry, the same id)."""
    return "L" + hashlib.sha256(f"{stream}:{entry_id}".encode()).hexdigest()[:25].upper()


def _recipients(raw: str) -> tuple[str, ...]:
    raw = raw.strip()
    if raw.startswith("["):
        try:
            values = json.loads(raw)
        except ValueError:
            raise LegacyEntryError("field 'to': not a JSON list") from None
        items = [str(v) for v in values]
    else:
        items = re.split(r"[,\s]+", raw)
    rcpts = tuple(r.strip().strip("<>") for r in items if r.strip())
    if not rcpts:
        raise LegacyEntryError("field 'to': no recipient")
    return rcpts


def _has_header_block(data: bytes) -> bool:
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return bool(re.match(rb"^[\x21-\x39\x3b-\x7e]+:", head)) and len(head) < len(data)


def parse(fields: Mapping[str, str]) -> LegacyMessage:
    """A legacy entry's message. Raises LegacyEntryError naming what is wrong."""
    for name in ("from", "to", "body"):
        if name not in fields:
            raise LegacyEntryError(f"field {name!r} is missing")
    try:
        data = base64.b64decode(fields["body"], validate=True)
    except (binascii.Error, ValueError):
        raise LegacyEntryError("field 'body': not base64") from None
    mail_from = fields["from"].strip().strip("<>")
    rcpts = _recipients(fields["to"])
    if not _has_header_block(data):
        # just the text: give it the headers a mail needs
        msg = EmailMessage()
        msg["From"] = mail_from
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = fields.get("subject", "")
        msg["Date"] = email.utils.formatdate(localtime=False)
        msg["Message-ID"] = email.utils.make_msgid(domain="smtpproxy.legacy")
        msg.set_content(data.decode("utf-8", "replace"))
        data = msg.as_bytes(policy=SMTP)
    account = fields.get("account_id", "")
    return LegacyMessage(
        mail_from=mail_from,
        rcpt_to=rcpts,
        body=data,
        account_id=int(account) if account.isdigit() else None,
    )
