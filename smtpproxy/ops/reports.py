"""Pure helpers behind the operator reports (`logs`, `stats`, `message show`,
`queue status`): parsing times, summing delivery attempts up by status, provider,
account and tenant, and shaping numbers for people. Nothing here does I/O; the CLI
fetches rows and hands them over.

Attempts fall in three classes: `delivered`; `retried` (a transient failure: `retrying`,
or `failover` to the next provider); and `failed` (everything else: `failed`, `dlq`,
`storage_error`). A success rate is delivered attempts over all attempts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from smtpproxy import models
from smtpproxy.delivery.pacing import PACED
from smtpproxy.errors import UsageError
from smtpproxy.models import FINAL, Status, values

DELIVERED = "delivered"
TRANSIENT = frozenset({"retrying", "failover"})
# the statuses a delivery_logs row can have (the message statuses and `failover`)
LOG_STATUSES = tuple(sorted({s.value for s in Status} | {"failover"}))

_UNITS = {
    "s": 1,
    "sec": 1,
    "m": 60,
    "min": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)(?:\s+ago)?")


# -- times -----------------------------------------------------------------------------


def parse_when(text: str, now: datetime, option: str = "--since") -> datetime:
    """A point in time from the command line: a duration back from now (30m, 2h, 7d,
    1w), `now`, `today`, `yesterday`, or an ISO date or time (2024-05-01,
    2024-05-01T10:00, 2024-05-01 10:00:00+02:00). Times without an offset are UTC."""
    value = text.strip().lower()
    if value == "now":
        return now
    if value in ("today", "yesterday"):
        midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight - timedelta(days=1 if value == "yesterday" else 0)
    m = _RELATIVE.fullmatch(value)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        parsed = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise UsageError(
            f"{option} {text!r}: expected a duration back from now (30m, 2h, 7d) "
            "or an ISO date or time (2024-05-01, 2024-05-01T10:00)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def time_range(
    since: str | None, until: str | None, now: datetime, default_since: str | None = None
) -> tuple[datetime | None, datetime | None]:
    """--since/--until as datetimes (None when not given and no default)."""
    start_text = since if since is not None else default_since
    start = parse_when(start_text, now, "--since") if start_text is not None else None
    end = parse_when(until, now, "--until") if until is not None else None
    if start is not None and end is not None and start >= end:
        raise UsageError("--since must be before --until")
    return start, end


def format_age(seconds: float | None) -> str:
    """3s, 4m 10s, 2h 5m, 3d 4h."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def format_time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_ms(ms: float | None) -> str:
    """850 ms, 1.25 s."""
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f} ms"
    return f"{ms / 1000:.2f} s"


def format_rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def shorten(text: str | None, width: int) -> str:
    """The first line of text, cut to width characters with an ellipsis."""
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def recipients_cell(recipients: Sequence[str]) -> str:
    """The first recipient and how many more."""
    if not recipients:
        return "-"
    more = len(recipients) - 1
    return recipients[0] + (f" (+{more})" if more else "")


def header_id(text: str) -> str:
    """A header Message-ID as stored: without the angle brackets."""
    return text.strip().strip("<>").strip()


# -- stats -------------------------------------------------------------------------------


def outcome_class(status: str) -> str:
    if status == DELIVERED:
        return "delivered"
    if status in TRANSIENT:
        return "retried"
    return "failed"


def _rate(delivered: int, attempts: int) -> float | None:
    return round(delivered / attempts, 4) if attempts else None


class _Tally:
    __slots__ = ("attempts", "delivered", "failed", "retried", "total_ms")

    def __init__(self) -> None:
        self.attempts = 0
        self.delivered = 0
        self.retried = 0
        self.failed = 0
        self.total_ms = 0

    def add(self, status: str, attempts: int, total_ms: int) -> None:
        self.attempts += attempts
        self.total_ms += total_ms
        cls = outcome_class(status)
        if cls == "delivered":
            self.delivered += attempts
        elif cls == "retried":
            self.retried += attempts
        else:
            self.failed += attempts

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "delivered": self.delivered,
            "retried": self.retried,
            "failed": self.failed,
            "success_rate": _rate(self.delivered, self.attempts),
        }


def summarise(
    groups: Iterable[Mapping[str, Any]], p95: Mapping[str, float | None]
) -> dict[str, Any]:
    """Totals by status, provider, account and tenant from rows of
    (tenant_id, tenant, account_id, account, provider_name, status, attempts, total_ms),
    with the 95th percentile duration per provider from p95."""
    total = _Tally()
    by_status: dict[str, int] = {}
    providers: dict[str, _Tally] = {}
    accounts: dict[int, tuple[str, str, _Tally]] = {}
    tenants: dict[int, tuple[str, _Tally]] = {}
    for g in groups:
        status, n, ms = str(g["status"]), int(g["attempts"]), int(g["total_ms"] or 0)
        tenant = g["tenant"] or f"#{g['tenant_id']}"
        account = g["account"] or f"#{g['account_id']}"
        total.add(status, n, ms)
        by_status[status] = by_status.get(status, 0) + n
        providers.setdefault(str(g["provider_name"]), _Tally()).add(status, n, ms)
        accounts.setdefault(int(g["account_id"]), (account, tenant, _Tally()))[2].add(status, n, ms)
        tenants.setdefault(int(g["tenant_id"]), (tenant, _Tally()))[1].add(status, n, ms)

    by_provider = [
        {
            "provider": name,
            **tally.as_dict(),
            "avg_ms": round(tally.total_ms / tally.attempts, 1) if tally.attempts else None,
            "p95_ms": None if p95.get(name) is None else round(float(p95[name] or 0), 1),
        }
        for name, tally in providers.items()
    ]
    by_provider.sort(key=lambda r: (-r["attempts"], r["provider"]))
    by_account = [
        {"account": name, "tenant": tenant, **tally.as_dict()}
        for name, tenant, tally in accounts.values()
    ]
    by_account.sort(key=lambda r: (-r["attempts"], r["account"]))
    by_tenant = [{"tenant": name, **tally.as_dict()} for name, tally in tenants.values()]
    by_tenant.sort(key=lambda r: (-r["attempts"], r["tenant"]))
    return {
        "total": total.as_dict(),
        "by_status": dict(sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_provider": by_provider,
        "by_account": by_account,
        "by_tenant": by_tenant,
    }


# -- charts ------------------------------------------------------------------------------

BAR_CHARS = {"delivered": "█", "retried": "▒", "failed": "░"}


def bar_cells(counts: Sequence[int], scale_max: int, width: int) -> list[int]:
    """How many cells each stacked part of a bar gets, out of width cells for scale_max:
    cumulative rounding keeps the total true to scale, and any non-zero bar shows at
    least one cell."""
    if scale_max <= 0 or width <= 0:
        return [0 for _ in counts]
    cells = []
    done = 0
    running = 0
    for n in counts:
        running += n
        end = round(running * width / scale_max)
        cells.append(max(0, end - done))
        done = max(done, end)
    if sum(counts) > 0 and sum(cells) == 0:
        first = next(i for i, n in enumerate(counts) if n > 0)
        cells[first] = 1
    return cells


def bucket_label(start: datetime, by: str) -> str:
    start = start.astimezone(UTC)
    return start.strftime("%Y-%m-%d") if by == "day" else start.strftime("%Y-%m-%d %H:00")


def bucket_starts(since: datetime, until: datetime, by: str) -> list[datetime]:
    """The start of every hour or day (UTC) that overlaps [since, until)."""
    step = timedelta(days=1) if by == "day" else timedelta(hours=1)
    start = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if by == "day":
        start = start.replace(hour=0)
    out = []
    while start < until:
        out.append(start)
        start += step
    return out


def bucket_count(since: datetime, until: datetime, by: str) -> int:
    step = timedelta(days=1) if by == "day" else timedelta(hours=1)
    return int((until - since) / step) + 1


def series(
    groups: Iterable[Mapping[str, Any]], since: datetime, until: datetime, by: str
) -> list[dict[str, Any]]:
    """Delivered, retried and failed attempts per bucket, from groups that carry their
    bucket's start; every bucket of the range is there, empty ones too."""
    counts: dict[datetime, Counter[str]] = {
        start: Counter() for start in bucket_starts(since, until, by)
    }
    for g in groups:
        c = counts.get(g["bucket"])
        if c is not None:  # every row of the range is in one of the buckets
            n = int(g["attempts"])
            c["attempts"] += n
            c[outcome_class(str(g["status"]))] += n
    return [
        {"start": start, **{k: c[k] for k in ("attempts", "delivered", "retried", "failed")}}
        for start, c in counts.items()
    ]


# -- one message -------------------------------------------------------------------------


def body_state(message: Mapping[str, Any]) -> dict[str, Any]:
    """Whether the message's body is still in the store, from what PostgreSQL knows."""
    if message["status"] == "storage_error":
        state = "missing"  # found gone while the message was live
    elif message["body_deleted_at"] is not None:
        state = "deleted"  # retention removed it after the message finished
    else:
        state = "stored"
    return {
        "stored": state == "stored",
        "state": state,
        "storage_key": message["storage_key"],
        "deleted_at": message["body_deleted_at"],
    }


def _device(message: Mapping[str, Any]) -> str:
    """The words " (device NAME)" when a registered device sent it, else nothing."""
    return f" (device {message['device']})" if message.get("device") else ""


def timeline(
    message: Mapping[str, Any],
    children: Sequence[Mapping[str, Any]],
    attempts: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """The events of a message's life in time order: accepted, every attempt (its
    children's too), split, finished, body deleted, and the next attempt when one is due."""
    mid = message["id"]
    n = len(message["rcpt_to"])
    events: list[dict[str, Any]] = [
        {
            "at": message["created_at"],
            "event": "accepted",
            "message_id": mid,
            "detail": f"SMTP 250 from {message['client_ip'] or 'unknown address'}"
            f"{_device(message)} as {message['account']}: {message['size']:,} bytes, "
            f"{n} recipient{'s' if n != 1 else ''}",
        }
    ]
    for a in attempts:
        via = f" via {a['provider']}" if a["provider"] else ""
        detail = f"attempt {a['attempt']}{via}: {a['status']}"
        if a["duration_ms"]:
            detail += f" in {format_ms(a['duration_ms'])}"
        if a["error"]:
            detail += f": {a['error']}"
        events.append(
            {
                "at": a["time"],
                "event": "attempt",
                "message_id": a["message_id"],
                "status": a["status"],
                "detail": detail,
            }
        )
    for m in (message, *children):
        if m["finished_at"] is None:
            continue
        if m["status"] == "split":
            kids = [c["id"] for c in children if c["parent_id"] == m["id"]]
            detail = f"split by route into {len(kids)} messages: {', '.join(kids)}"
            events.append({"at": m["finished_at"], "event": "split", "message_id": m["id"]})
            events[-1]["detail"] = detail
        elif m["status"] in FINAL:
            reason = f": {m['last_error']}" if m["last_error"] and m["status"] != DELIVERED else ""
            events.append(
                {
                    "at": m["finished_at"],
                    "event": "finished",
                    "message_id": m["id"],
                    "status": m["status"],
                    "detail": f"{m['status']}{reason}",
                }
            )
    if message["body_deleted_at"] is not None:
        events.append(
            {
                "at": message["body_deleted_at"],
                "event": "body deleted",
                "message_id": mid,
                "detail": "retention removed the body from the store",
            }
        )
    for m in (message, *children):
        if m["status"] in models.CLAIMABLE and m["next_attempt_at"] is not None:
            detail = f"due (attempt {m['attempts'] + 1})"
            if (m["last_error"] or "").startswith(PACED):
                detail = f"{m['last_error']}; not counted as an attempt"
            events.append(
                {
                    "at": m["next_attempt_at"],
                    "event": "next attempt",
                    "message_id": m["id"],
                    "detail": detail,
                }
            )
    if message["status"] == "sending" and message.get("claimed_at") is not None:
        events.append(
            {
                "at": message["claimed_at"],
                "event": "sending",
                "message_id": mid,
                "detail": f"claimed by {message['claimed_by']}",
            }
        )
    order = {"accepted": 0, "attempt": 1, "split": 2, "finished": 3}
    events.sort(key=lambda e: (e["at"], order.get(e["event"], 4)))
    return events


# -- the queue ---------------------------------------------------------------------------

DEAD = values(models.DEAD)
_LIVE = values(models.LIVE)


def _earliest(values: Iterable[datetime | None]) -> datetime | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def queue_report(
    live: Sequence[Mapping[str, Any]],
    dead: Sequence[Mapping[str, Any]],
    tenant_names: Mapping[int, str],
    redis: Mapping[str, Any] | None,
    now: datetime,
) -> dict[str, Any]:
    """The queue per tenant, from PostgreSQL's live and dead rows per tenant and (when
    Redis answered) the streams: {"stream": key, "tenant_id": id or None, "length": n,
    "pending": n} entries under redis["streams"]."""
    tenants: dict[int, dict[str, Any]] = {}

    def entry(tenant_id: int) -> dict[str, Any]:
        if tenant_id not in tenants:
            tenants[tenant_id] = {
                "tenant": tenant_names.get(tenant_id, f"#{tenant_id}"),
                "tenant_id": tenant_id,
                **dict.fromkeys(_LIVE, 0),
                "next_retry_at": None,
                "oldest_live_at": None,
                "oldest_live_age_s": None,
                **dict.fromkeys(DEAD, 0),
                "dead": 0,
                "stream_length": None,
                "stream_pending": None,
            }
        return tenants[tenant_id]

    for r in live:
        e = entry(int(r["tenant_id"]))
        for k in _LIVE:
            e[k] = int(r[k])
        e["next_retry_at"] = r["next_retry_at"]
        e["oldest_live_at"] = r["oldest_live_at"]
        e["oldest_live_age_s"] = _age(r["oldest_live_at"], now)
    for r in dead:
        e = entry(int(r["tenant_id"]))
        for k in DEAD:
            e[k] = int(r[k])
        e["dead"] = sum(int(r[k]) for k in DEAD)
    if redis is not None:
        for s in redis["streams"]:
            if s["tenant_id"] is not None and (s["length"] or s["pending"]):
                e = entry(int(s["tenant_id"]))
                e["stream_length"] = s["length"]
                e["stream_pending"] = s["pending"]
        for e in tenants.values():
            e["stream_length"] = e["stream_length"] or 0
            e["stream_pending"] = e["stream_pending"] or 0
    rows = sorted(tenants.values(), key=lambda e: e["tenant"])
    oldest = _earliest(e["oldest_live_at"] for e in rows)
    totals: dict[str, Any] = {k: sum(e[k] for e in rows) for k in (*_LIVE, *DEAD, "dead")}
    totals["next_retry_at"] = _earliest(e["next_retry_at"] for e in rows)
    totals["oldest_live_at"] = oldest
    totals["oldest_live_age_s"] = _age(oldest, now)
    return {"tenants": rows, "totals": totals}


def _age(then: datetime | None, now: datetime) -> float | None:
    return None if then is None else round(max(0.0, (now - then).total_seconds()), 1)


def format_due(at: datetime | None, now: datetime) -> str:
    """When a retry is due: its time, and how far off (or overdue) it is."""
    if at is None:
        return "-"
    delta = (at - now).total_seconds()
    when = "in " + format_age(delta) if delta >= 0 else format_age(-delta) + " overdue"
    return f"{format_time(at)} ({when})"
