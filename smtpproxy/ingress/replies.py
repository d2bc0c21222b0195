"""SMTP reply texts, and the enhanced status codes (RFC 3463 / RFC 2034) they carry. Pure.

Every reply smtpproxy makes is here or passes through with_enhanced_code(), which adds a
class-appropriate enhanced code to aiosmtpd's own replies that lack one. No reply ever
carries an internal error text.
"""

from __future__ import annotations

import re

_HAS_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}(?:\s|$)")
_DEFAULTS = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}


def with_enhanced_code(reply: str) -> str:
    """Insert the default enhanced code after a 2xx/4xx/5xx reply code that has none."""
    # 220 is the greeting (RFC 5321: the domain comes first) and STARTTLS's go-ahead
    if len(reply) < 4 or not reply[:3].isdigit() or reply[0] not in "245" or reply[:3] == "220":
        return reply
    code, sep, text = reply[:3], reply[3], reply[4:]
    if sep not in " -" or _HAS_ENHANCED.match(text):
        return reply
    enhanced = _DEFAULTS.get(code, f"{code[0]}.0.0")
    return f"{code}{sep}{enhanced} {text}" if text else f"{code}{sep}{enhanced}"


QUEUED = "250 2.0.0 Ok: queued as {id}"
SENDER_OK = "250 2.1.0 Sender ok"
RECIPIENT_OK = "250 2.1.5 Recipient ok"
TEMPFAIL = "451 4.3.0 Temporary failure, please try again later"
TEMPFAIL_STORAGE = "451 4.3.0 Temporary storage failure, please try again later"
TEMPFAIL_QUEUE = "451 4.3.0 Temporary queueing failure, please try again later"
AUTH_TEMPFAIL = "454 4.7.0 Temporary authentication failure, please try again later"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
SENDER_UNQUALIFIED = "553 5.1.7 Sender address must be a fully-qualified mailbox (user@example.com)"
RECIPIENT_UNQUALIFIED = (
    "553 5.1.3 Recipient address must be a fully-qualified mailbox (user@example.com)"
)
SENDER_DENIED = "550 5.7.1 Sender address not allowed for this account"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = (
    "554 5.6.0 Message has a line longer than {limit} octets (RFC 5322 2.1.1); wrap the"
    " lines or encode the part (quoted-printable, base64)"
)
MALFORMED_ADDRESS = "553 5.1.3 Address contains control characters or invalid UTF-8"
NEEDS_SMTPUTF8 = "553 5.6.7 Must declare SMTPUTF8 to send a UTF-8 address"
IMPROPER_PIPELINING = "421 4.5.0 Improper command pipelining after DATA, closing connection"
DATA_TOO_SLOW = "421 4.4.2 Message data arriving too slowly, closing connection"
STARTTLS_READY = "220 2.0.0 Ready to start TLS"
BARE_NEWLINE = "550 5.5.2 Bare CR or LF in message data is not allowed (RFC 5321 2.3.8)"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
IDLE_TIMEOUT = "421 4.4.2 Idle too long, closing connection"
SESSION_TOO_LONG = "421 4.4.2 Session too long, closing; please reconnect"
HEADER_FROM_DENIED = "550 5.7.1 Header From address not allowed for this account"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
