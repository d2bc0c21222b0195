"""Microsoft 365 pacing, in real time: one printer's mailbox sends 200 messages and
another mailbox 20, at once, to a tenant whose Exchange allows 30 messages a minute and
4 requests at once per mailbox (the Graph test server enforces both and answers 429
beyond them). Every message must be delivered without a single 429; the busy mailbox
at most 30 in any 60 seconds; the quiet one not held up by it.

    just bench-m365                       # 200 + 20, about six and a half minutes
    just bench-m365 --busy 60 --quiet 10  # shorter

It starts `smtpproxy run` (its own database, key prefix and data directory) with a
msgraph provider pointed at the Graph test server (tests/support/fake_graph.py), which
answers each request after --graph-delay seconds, like a real API's round trip.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from tests.bench.ingest import services
from tests.bench.targets import SmtpProxyInstance
from tests.support import smtp
from tests.support.fake_graph import FakeGraph

BUSY, QUIET = "printer@contoso.example", "frontdesk@contoso.example"


def provider(fake: FakeGraph) -> dict[str, Any]:
    return {
        "type": "msgraph",
        "endpoint": fake.url,
        "login_endpoint": fake.url,
        "tenant_id": fake.tenant_id,
        "client_id": fake.client_id,
        "secret": fake.client_secret,
        "send_as": "sender",
        "allowed_senders": "contoso.example",
    }


def send(inst: SmtpProxyInstance, sender: str, count: int, accepted: dict[str, float]) -> None:
    """count unique messages from sender in one session; when each got its 250."""
    with smtp.connect(inst.port, starttls=False, timeout=30) as client:
        smtp.login(client, inst.user, inst.password)
        for n in range(count):
            body = smtp.message(subject=f"scan {n} from {sender}", sender=sender)
            refused = client.sendmail(sender, ["bob@example.org"], body)
            assert not refused, refused
            accepted[f"{sender} {n}"] = time.monotonic()


def most_in_a_minute(times: list[float]) -> int:
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= 60:
            first += 1
        most = max(most, last - first + 1)
    return most


def run(args: argparse.Namespace) -> dict[str, Any]:
    admin_url, redis_url = services()
    total = args.busy + args.quiet
    with FakeGraph(
        users=(BUSY, QUIET),
        mailbox_concurrency=4,
        mailbox_per_minute=30,
        graph_delay=args.graph_delay,
    ) as fake:
        inst = SmtpProxyInstance(
            admin_url,
            redis_url,
            deliver=True,
            settings={
                "delivery": {"enabled": True, "default_route": "m365"},
                "providers": {"m365": provider(fake)},
            },
        )
        try:
            accepted: dict[str, float] = {}
            start = time.monotonic()
            senders = [
                threading.Thread(target=send, args=(inst, BUSY, args.busy, accepted)),
                threading.Thread(target=send, args=(inst, QUIET, args.quiet, accepted)),
            ]
            for t in senders:
                t.start()
            for t in senders:
                t.join()
            accepted_in = time.monotonic() - start
            deadline = start + args.busy / 30 * 60 + 180
            while len(fake.sent) < total and time.monotonic() < deadline:
                time.sleep(0.5)
            sent = list(fake.sent)
            delivered = inst.count("delivered")
        finally:
            inst.close()
    busy = [s.at - start for s in sent if s.user == BUSY]
    quiet = [s.at - start for s in sent if s.user == QUIET]
    return {
        "accepted": len(accepted),
        "accepted_in": accepted_in,
        "delivered": delivered,
        "throttled": len(fake.throttled),
        "most_at_once": max(fake.most_at_once.values(), default=0),
        "busy_sent": len(busy),
        "busy_most_in_a_minute": most_in_a_minute(busy),
        "busy_last": max(busy, default=0.0),
        "quiet_sent": len(quiet),
        "quiet_last": max(quiet, default=0.0),
        "total": total,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="just bench-m365", description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", type=int, default=200, help="messages from the busy mailbox")
    p.add_argument("--quiet", type=int, default=20, help="messages from the other mailbox")
    p.add_argument("--graph-delay", type=float, default=0.2, help="Graph answers after (s)")
    args = p.parse_args(argv)
    r = run(args)
    print(
        f"accepted {r['accepted']}/{r['total']} in {r['accepted_in']:.1f} s; "
        f"delivered {r['delivered']}; 429s from Graph: {r['throttled']}; "
        f"most requests at once for one mailbox: {r['most_at_once']}"
    )
    print(
        f"busy mailbox: {r['busy_sent']} sent, at most {r['busy_most_in_a_minute']} in any "
        f"60 s, the last {r['busy_last']:.0f} s after the first was accepted"
    )
    print(f"quiet mailbox: {r['quiet_sent']} sent, the last {r['quiet_last']:.1f} s after start")
    ok = (
        r["delivered"] == r["total"]
        and r["throttled"] == 0
        and r["busy_most_in_a_minute"] <= 30
        and r["most_at_once"] <= 4
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
