"""Sending at a mailbox's pace, across every instance (counted in Redis).

Exchange Online lets one mailbox send 30 messages a minute and 10,000 recipients a
day, with 4 requests at once per application (more get 429 MailboxConcurrency). A
provider that sends as mailboxes (msgraph) says, per delivery, which mailbox sends and
its limits (a Pace); before the call the deliverer asks the Pacer for admission.

* The minute: a sliding log of sends per mailbox, 60 seconds plus TRAVEL wide (Exchange
  counts a send when it arrives, and one request may travel longer than the next). A
  message over the pace is not refused but given a slot: the earliest time at which
  sending it keeps every window at the limit, reserved in the log under its id. The
  message waits for its slot durably (back in PostgreSQL with next_attempt_at, not
  counted as an attempt), and when it comes back (at most EARLY before its slot) it
  is let through at its slot: no message is turned away twice, however long the
  queue behind one busy mailbox.
* The day: a rolling 24-hour count of recipients per mailbox; a message that would pass
  it waits until enough of the day's recipients have left the window.
* A hold: a 429 with Retry-After for a mailbox stops that mailbox alone for that long.

One busy mailbox never slows another: every count is per mailbox. The concurrency
limit is kept in each process (delivery/breaker.py Throttle), so with several
instances it is per instance.
"""

from __future__ import annotations

import time
from typing import Any

import attrs

from smtpproxy.queue.streams import mapped_errors

MINUTE = 60.0
DAY = 86400.0
# Exchange counts a send when the request arrives, and requests take different times to
# get there: a slot is a minute and this much after the send it follows.
TRAVEL = 1.0
# a reserved message back this long before its slot (the scheduler's granularity) is let
# through to wait for its slot in the process, not sent back through PostgreSQL
EARLY = 2.0

# KEYS: sends, recipients, hold; ARGV: now, message id, recipients, per minute, per day,
# early, window -> {allowed (0/1), seconds to wait (text; when allowed, before sending),
# what limits it}
_ADMIT = """
local now = tonumber(ARGV[1])
local id = ARGV[2]
local n = tonumber(ARGV[3])
local per_minute = tonumber(ARGV[4])
local per_day = tonumber(ARGV[5])
local early = tonumber(ARGV[6])
local window = tonumber(ARGV[7])
local held = redis.call('PTTL', KEYS[3])
if held > 0 then
  return {0, tostring(held / 1000), 'hold'}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 86400)
local slot = redis.call('ZSCORE', KEYS[1], id)
if slot then
  local wait = tonumber(slot) - now
  if wait > early then
    return {0, tostring(wait), 'minute'}
  end
  return {1, tostring(math.max(wait, 0)), ''}
end
local day = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
local total = 0
for i = 1, #day, 2 do
  total = total + tonumber(string.match(day[i], ':(%d+)$'))
end
if total + n > per_day then
  local need = total + n - per_day
  local freed = 0
  for i = 1, #day, 2 do
    freed = freed + tonumber(string.match(day[i], ':(%d+)$'))
    if freed >= need then
      return {0, tostring(tonumber(day[i + 1]) + 86400 - now), 'day'}
    end
  end
  return {0, '86400', 'day'}
end
local sends = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local k = #sends / 2
slot = now
if k >= per_minute then
  local last = tonumber(sends[#sends])
  local nth = tonumber(sends[(k - per_minute) * 2 + 2])
  slot = math.max(now, last, nth + window)
end
redis.call('ZADD', KEYS[1], slot, id)
redis.call('EXPIRE', KEYS[1], math.ceil(slot - now) + 120)
redis.call('ZADD', KEYS[2], now, id .. ':' .. n)
redis.call('EXPIRE', KEYS[2], 86400 + 120)
if slot - now > early then
  return {0, tostring(slot - now), 'minute'}
end
return {1, tostring(slot - now), ''}
"""


@attrs.frozen
class Pace:
    """Who sends a delivery, and the limits of that sender."""

    key: str  # what is counted: the same mailbox, whichever provider sends as it
    label: str  # for people: the mailbox's address
    per_minute: int = 30
    recipients_per_day: int = 10_000
    concurrency: int = 4

    def describe(self) -> str:
        return f"{self.per_minute} messages a minute, {self.recipients_per_day} recipients a day"


@attrs.frozen
class Admission:
    allowed: bool
    wait: float = 0.0  # seconds until it may go (allowed: to wait in the process first)
    limit: str = ""  # what holds it: "minute", "day" or "hold" (a 429)


def waiting_reason(pace: Pace, admission: Admission) -> str:
    """How `message show` and the logs say why a message waits."""
    why = {
        "minute": f"its {pace.per_minute} messages a minute",
        "day": f"its {pace.recipients_per_day} recipients a day",
        "hold": "a 429 Retry-After from the provider",
    }.get(admission.limit, admission.limit)
    return f"{PACED} {pace.label} ({why})"


PACED = "waiting for the pace of mailbox"  # how a paced message's last_error starts


class Pacer:
    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = f"{prefix}:pace"
        self._admit = client.register_script(_ADMIT)

    def _keys(self, pace: Pace) -> list[str]:
        base = f"{self._prefix}:{pace.key}"
        return [f"{base}:sends", f"{base}:recipients", f"{base}:hold"]

    def admit(
        self, pace: Pace, message_id: str, recipients: int, now: float | None = None
    ) -> Admission:
        """Blocking: may this message go now? If not, it holds a slot (or waits for the
        day's window or a hold) and is told how long to wait. Allowed with a wait: its
        slot is less than EARLY away, to be waited for before sending."""
        args = (
            time.time() if now is None else now,
            message_id,
            recipients,
            pace.per_minute,
            pace.recipients_per_day,
            EARLY,
            MINUTE + TRAVEL,
        )
        with mapped_errors():
            allowed, wait, limit = self._admit(keys=self._keys(pace), args=args)
        text = limit.decode() if isinstance(limit, bytes) else str(limit)
        return Admission(bool(int(allowed)), max(0.0, float(wait)), text)

    def hold(self, pace: Pace, seconds: float) -> None:
        """Blocking: stop this mailbox for `seconds` (its provider said 429)."""
        with mapped_errors():
            self._client.set(self._keys(pace)[2], "1", px=max(1, int(seconds * 1000)))
