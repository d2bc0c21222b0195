"""Relay benchmarks: smtpproxy accepting and delivering through a provider API, against
Postfix relaying the same mail to smtp-sink. Issue 12's figures, one command each.

    just bench-relay                         # end to end, vs Postfix, A B A B
    just bench-relay --provider ses          # the same through SES's API (raw MIME)
    just bench-relay --provider sendgrid,ses,file   # each, and Postfix, in every round
    just bench-relay --provider file --no-postfix
    just bench-relay --drain                 # a 6,000-message backlog, then delivery on
    just bench-relay --drain --delay 0.2     # ... to a provider answering after 200 ms
    just bench-relay --ingest-while-delivering   # ingest alone vs ingest with delivery
    just bench-relay --compare-split         # a delivery process of its own vs none
    just bench-relay --at-rest               # each run waits out ext4's slow time after deletes

End to end: 50 sessions send 10,000 unique 10 KB messages (AUTH for smtpproxy; Postfix
trusts 127.0.0.0/8) while the target delivers them; the rate is messages over the time
from the first message sent to the last one delivered (smtpproxy: `delivered` in
PostgreSQL; Postfix: its queue empty and every message logged `status=sent`). The
provider is nginx answering at once (tests/bench/httpsink.py), Postfix's next hop is
smtp-sink. Drain: the backlog is accepted with delivery off, then the instance is
restarted with delivery on, and the rate is the backlog over the time from ready to
the last delivery. Postfix needs the `postfix` package and root; the provider needs
`nginx-light`. Runs delete their files only when the benchmark ends: ext4 creates files
slowly for minutes after mass deletes, and a run must not pay for the one before it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from tests.bench.httpsink import DelayedSink, NginxSink
from tests.bench.ingest import services, settle_filesystem
from tests.bench.smtpload import Target, load
from tests.bench.targets import (
    PostfixInstance,
    PostfixUnavailable,
    SmtpProxyInstance,
    free_port,
    machine_busy_seconds,
    note_cleanup,
)

Sink = NginxSink | DelayedSink
# data directories of finished runs, deleted when the benchmark ends (targets.py)
LEFT: list[tempfile.TemporaryDirectory[str]] = []


def _outbox() -> Path:
    """Where the file provider writes, removed with the other files at the end."""
    directory = tempfile.TemporaryDirectory(prefix="smtpproxy-bench-outbox-", dir="/var/tmp")
    LEFT.append(directory)
    return Path(directory.name)


def provider_settings(provider: str, sink: Sink | None, outbox: Path) -> dict[str, Any]:
    """The [providers.bench] table for a provider type pointed at the sink."""
    if provider == "file":
        return {"type": "file", "path": str(outbox)}
    assert sink is not None
    table: dict[str, Any] = {"type": provider, "endpoint": sink.url}
    if provider == "sendgrid":
        table["secret"] = "SG.bench"
    elif provider == "ses":
        table |= {"region": "us-east-1", "access_key_id": "AKIDBENCH", "secret": "bench"}
    elif provider == "postmark":
        table["secret"] = "bench-server-token"
    elif provider == "mailgun":
        table |= {"domain": "bench.example.org", "secret": "key-bench"}
    return table


def delivery_settings(args: argparse.Namespace, sink: Sink | None, outbox: Path) -> dict[str, Any]:
    table = provider_settings(args.provider, sink, outbox)
    if args.max_connections:
        table["max_connections"] = args.max_connections
    delivery: dict[str, Any] = {"enabled": True, "default_route": "bench"}
    if args.concurrency:
        delivery["concurrency"] = args.concurrency
    settings = {"delivery": delivery, "providers": {"bench": table}}
    if args.delivery_processes is not None:
        settings["run"] = {"delivery_processes": args.delivery_processes}
    return settings


@contextmanager
def provider_sink(args: argparse.Namespace) -> Iterator[Sink | None]:
    if args.provider == "file":
        yield None
        return
    sink: Sink = DelayedSink(args.delay, args.provider) if args.delay else NginxSink(args.provider)
    try:
        yield sink
    finally:
        sink.close()


class Sampler:
    """The peak resident memory of some processes, sampled every 0.2 s."""

    def __init__(self, rss: Callable[[], float]) -> None:
        self._rss = rss
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with suppress(OSError):  # a process that just exited
                self.peak = max(self.peak, self._rss())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def wait_for(done: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll done() every 50 ms; the time it became true."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not done after {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter()


def end_to_end_smtpproxy(args: argparse.Namespace) -> dict[str, Any]:
    admin_url, redis_url = services()
    outbox = _outbox()
    with provider_sink(args) as sink:
        inst = SmtpProxyInstance(
            admin_url,
            redis_url,
            deliver=True,
            max_connections=max(1000, args.sessions * 2),
            processes=args.processes,
            settings=delivery_settings(args, sink, outbox),
        )
        try:
            sampler = Sampler(inst.rss_mb)
            cpu0, busy0 = inst.cpu_seconds(), machine_busy_seconds()
            start = time.perf_counter()
            ingest = asyncio.run(
                load(
                    Target("127.0.0.1", inst.port, inst.user, inst.password),
                    sessions=args.sessions,
                    messages=args.messages,
                    size=args.size,
                )
            )
            accepted = ingest["accepted"]
            end = wait_for(lambda: inst.count("delivered") >= accepted, 600, "delivery")
            cpu = inst.cpu_seconds() - cpu0
            busy = machine_busy_seconds() - busy0 - ingest["generator_cpu"]
            rss = sampler.stop()
            failed = accepted - inst.count("delivered")
        finally:
            for line in [
                m for m in inst.procs[0].lines if m.get("level") in ("WARNING", "ERROR", "CRITICAL")
            ]:
                print(f"  smtpproxy logged: {line}", flush=True)
            inst.close(keep_files=LEFT)
    elapsed = end - start
    return {
        "target": f"smtpproxy/{args.provider}" + _split_label(args),
        "accepted": accepted,
        "not_delivered": failed,
        "elapsed": elapsed,
        "rate": accepted / elapsed,
        "ingest_rate": ingest["rate"],
        "cpu_ms": cpu / accepted * 1000,
        "machine_ms": busy / accepted * 1000,
        "rss_mb": rss,
    }


def end_to_end_postfix(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("smtp-sink") is None:
        raise PostfixUnavailable("smtp-sink is not installed (apt-get install postfix)")
    sink_port = free_port()
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "postfix", f"127.0.0.1:{sink_port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        inst = PostfixInstance(processes=max(100, args.sessions + 10), relay_to=sink_port)
        try:
            busy0 = machine_busy_seconds()
            start = time.perf_counter()
            ingest = asyncio.run(
                load(
                    Target("127.0.0.1", inst.port),
                    sessions=args.sessions,
                    messages=args.messages,
                    size=args.size,
                )
            )
            accepted = ingest["accepted"]
            end = wait_for(
                lambda: inst.queued() == 0 and inst.sent() >= accepted, 600, "Postfix delivery"
            )
            busy = machine_busy_seconds() - busy0 - ingest["generator_cpu"]
            rss = inst.rss_mb()
            sent = inst.sent()
        finally:
            inst.close()
    finally:
        sink.terminate()
        sink.wait(10)
    elapsed = end - start
    return {
        "target": "postfix/smtp-sink",
        "accepted": accepted,
        "not_delivered": accepted - sent,
        "elapsed": elapsed,
        "rate": accepted / elapsed,
        "ingest_rate": ingest["rate"],
        "cpu_ms": float("nan"),
        "machine_ms": busy / accepted * 1000,
        "rss_mb": rss,
    }


def _split_label(args: argparse.Namespace) -> str:
    if args.delivery_processes is None:
        return ""
    return f", {args.delivery_processes} delivery process(es)"


def variant(**changes: Any) -> Callable[[argparse.Namespace], dict[str, Any]]:
    """end_to_end_smtpproxy with some arguments changed (a provider, delivery processes)."""

    def run(args: argparse.Namespace) -> dict[str, Any]:
        return end_to_end_smtpproxy(argparse.Namespace(**{**vars(args), **changes}))

    return run


def drain(args: argparse.Namespace) -> dict[str, Any]:
    admin_url, redis_url = services()
    outbox = _outbox()
    with provider_sink(args) as sink:
        inst = SmtpProxyInstance(admin_url, redis_url, max_connections=max(1000, args.sessions))
        try:
            backlog = asyncio.run(
                load(
                    Target("127.0.0.1", inst.port, inst.user, inst.password),
                    sessions=args.sessions,
                    messages=args.backlog,
                    size=args.size,
                )
            )["accepted"]
            inst.restart(delivery_settings(args, sink, outbox))
            sampler = Sampler(inst.rss_mb)
            cpu0, busy0 = inst.cpu_seconds(), machine_busy_seconds()
            start = time.perf_counter()
            end = wait_for(lambda: inst.count("delivered") >= backlog, 900, "the drain")
            cpu = inst.cpu_seconds() - cpu0
            busy = machine_busy_seconds() - busy0
            rss = sampler.stop()
        finally:
            inst.close(keep_files=LEFT)
    elapsed = end - start
    where = f"{args.delay * 1000:.0f} ms provider" if args.delay else "instant provider"
    return {
        "target": f"smtpproxy/{args.provider} drain, {where}",
        "accepted": backlog,
        "not_delivered": 0,
        "elapsed": elapsed,
        "rate": backlog / elapsed,
        "ingest_rate": float("nan"),
        "cpu_ms": cpu / backlog * 1000,
        "machine_ms": busy / backlog * 1000,
        "rss_mb": rss,
    }


def ingest_alone(args: argparse.Namespace) -> dict[str, Any]:
    admin_url, redis_url = services()
    inst = SmtpProxyInstance(admin_url, redis_url, max_connections=max(1000, args.sessions * 2))
    try:
        r = asyncio.run(
            load(
                Target("127.0.0.1", inst.port, inst.user, inst.password),
                sessions=args.sessions,
                messages=args.messages,
                size=args.size,
            )
        )
    finally:
        inst.close(keep_files=LEFT)
    return {
        "target": "smtpproxy ingest alone",
        "accepted": r["accepted"],
        "not_delivered": float("nan"),
        "elapsed": r["elapsed"],
        "rate": r["rate"],
        "ingest_rate": r["rate"],
        "cpu_ms": float("nan"),
        "machine_ms": float("nan"),
        "rss_mb": float("nan"),
    }


def show(r: dict[str, Any]) -> None:
    """One line per run; a figure the run did not measure (nan) is left out."""

    def measured(key: str) -> bool:
        return not math.isnan(r[key])

    line = f"[{r['target']}] {r['accepted']} messages in {r['elapsed']:.1f} s: "
    line += f"{r['rate']:.0f} msgs/s end to end"
    if measured("ingest_rate"):
        line += f" (ingest {r['ingest_rate']:.0f} msgs/s)"
    if measured("cpu_ms"):
        line += f"; CPU {r['cpu_ms']:.2f} ms/msg in the target, {r['machine_ms']:.2f} ms/msg "
        line += f"machine-wide; peak RSS {r['rss_mb']:.0f} MB"
    if measured("not_delivered"):
        line += f"; not delivered: {r['not_delivered']}"
    print(line, flush=True)


def arguments() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--provider",
        help="sendgrid (default), ses, file, postmark or mailgun; several, comma-separated, "
        "run one after the other in each round",
    )
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--size", type=int, default=10 * 1024)
    p.add_argument("--rounds", type=int, default=2, help="A B pairs, alternating")
    p.add_argument("--no-postfix", action="store_true", help="smtpproxy only")
    p.add_argument("--drain", action="store_true", help="the backlog drain instead")
    p.add_argument("--backlog", type=int, default=6_000)
    p.add_argument("--delay", type=float, default=0.0, help="provider answers after (s)")
    p.add_argument("--concurrency", type=int, default=0, help="delivery.concurrency")
    p.add_argument("--max-connections", type=int, default=0, help="the provider's setting")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument(
        "--delivery-processes",
        type=int,
        help="run.delivery_processes (default: the config's default, 1 on two cores or more)",
    )
    p.add_argument(
        "--compare-split",
        action="store_true",
        help="run.delivery_processes 0 against 1, alternately (no Postfix)",
    )
    p.add_argument("--ingest-while-delivering", action="store_true")
    p.add_argument(
        "--at-rest",
        action="store_true",
        help="first wait until ext4 is past its slow time after a benchmark's deletes",
    )
    args = p.parse_args()
    args.providers = (args.provider or "sendgrid").split(",")
    args.provider = args.providers[0]
    return args


def compare(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> None:
    """In each round, every target's rate over the last one's (Postfix, or ingest
    alone against ingest while delivering)."""
    names = list(results)
    if args.ingest_while_delivering:  # ingest with delivery, over ingest alone
        alone, both = results[names[0]], results[names[1]]
        for i, (ra, rb) in enumerate(zip(alone, both, strict=False), start=1):
            ratio = rb["ingest_rate"] / ra["ingest_rate"]
            print(f"round {i}: ingest while delivering / alone = {ratio:.2f}x")
        return
    base = names[-1]
    for name in names[:-1]:
        for i, (ra, rb) in enumerate(zip(results[name], results[base], strict=False), start=1):
            print(f"round {i}: {name} / {base} = {ra['rate'] / rb['rate']:.2f}x")


def main() -> None:
    args = arguments()
    with suppress(ImportError):
        import uvloop

        uvloop.install()
    runs: list[Callable[[argparse.Namespace], dict[str, Any]]]
    if args.drain:
        runs = [drain]
    elif args.ingest_while_delivering:
        runs = [ingest_alone, end_to_end_smtpproxy]
    elif args.compare_split:
        runs = [variant(delivery_processes=1), variant(delivery_processes=0)]
    else:
        runs = [variant(provider=p) for p in args.providers]
        if not args.no_postfix:
            runs.append(end_to_end_postfix)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for _ in range(args.rounds):
            for run in runs:
                # Postfix deletes its queue files as it delivers: every run waits out the
                # slow time after the one before, so neither pays for the other
                settle_filesystem(args.at_rest)
                r = run(args)
                show(r)
                results.setdefault(r["target"], []).append(r)
    except PostfixUnavailable as exc:
        sys.exit(f"cannot run the Postfix comparison: {exc}")
    finally:
        for tmp in LEFT:
            tmp.cleanup()
        if LEFT:
            note_cleanup()
    if len(results) >= 2:
        compare(args, results)


if __name__ == "__main__":
    main()
