"""Ingest benchmark: N concurrent SMTP sessions sending M messages of S bytes.

By default it starts a fresh `smtpproxy run` (its own database on the PostgreSQL named
by SMTPPROXY_TEST_DATABASE_URL, its own Redis key prefix, delivery disabled so only
ingest is measured), loads it (tests/bench/smtpload.py: AUTH once per session, then
pipelined MAIL/RCPT/DATA per message, or a new connection per message with
--new-connection), and prints accepted msgs/s, DATA-to-250 latency percentiles, CPU
per message and resident memory. Every 250 is durable: body synced, row committed, id
on the stream; the run checks that PostgreSQL holds exactly the messages that got 250.

CPU per message is given twice: the target's own processes, and the whole machine
(PostgreSQL and Redis included, the load generator's own CPU taken out), which is the
fair figure to compare with Postfix, whose queue is its own files.

    just bench                                   # 50 sessions, 20,000 x 10 KB
    just bench --rate 1000                       # latency at a fixed offered load
    just bench --new-connection --tls            # a new STARTTLS + AUTH session per message
    just bench --idle 1000                       # memory with 1,000 idle sessions
    just bench --idle 2000 --tls --bursts 3      # and what bursts of STARTTLS sessions leave
    just bench --processes 2                     # smtpproxy run with run.processes = 2
    just bench --compare-postfix                 # the same load on Postfix's smtpd, then the ratio
    just bench --target postfix --generator smtp-source   # Postfix driven by its own smtp-source
    just bench --host 10.0.0.5 --port 2525 --user bench --password-stdin   # an instance you run
    just bench-report                            # every figure issue 6 asks for, in one go
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
from typing import Any

from tests.bench.smtpload import Target, close_all, hold_idle, load
from tests.bench.targets import (
    FS_SETTLE_SECONDS,
    PostfixInstance,
    PostfixUnavailable,
    SmtpProxyInstance,
    machine_busy_seconds,
    seconds_since_cleanup,
)

Instance = SmtpProxyInstance | PostfixInstance


def services() -> tuple[str, str]:
    return (
        os.environ.get(
            "SMTPPROXY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        os.environ.get("SMTPPROXY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
    )


def start(kind: str, args: argparse.Namespace) -> Instance:
    if kind == "postfix":
        return PostfixInstance(processes=max(100, args.sessions + 10, args.idle + 10))
    admin_url, redis_url = services()
    return SmtpProxyInstance(
        admin_url,
        redis_url,
        tls=args.tls,
        deliver=args.deliver,
        max_connections=max(1000, args.sessions * 2, args.idle + 100),
        env=dict(item.split("=", 1) for item in args.env),
        processes=args.processes,
    )


def target_of(inst: Instance, args: argparse.Namespace) -> Target:
    if isinstance(inst, SmtpProxyInstance):
        return Target("127.0.0.1", inst.port, inst.user, inst.password, args.tls)
    return Target("127.0.0.1", inst.port, tls=False)  # Postfix: trusted network, no AUTH


def run_smtp_source(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Postfix's own load generator (no AUTH, no TLS, no latency figures)."""
    cmd = ["smtp-source", "-s", str(args.sessions), "-m", str(args.messages)]
    cmd += ["-l", str(args.size), "-f", "bench@example.com", "-t", "sink@example.org"]
    if not args.new_connection:
        cmd.append("-d")  # keep the connection for the next message
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([*cmd, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "accepted": args.messages,  # smtp-source exits non-zero on any refusal
        "rejected": 0,
        "elapsed": elapsed,
        "rate": args.messages / elapsed,
        "p50_ms": None,
        "p99_ms": None,
        "generator_cpu": cpu,
    }


def settle_filesystem(wait: bool) -> None:
    """Wait out, or warn about, ext4's slow allocation after the last run's deletions."""
    since = seconds_since_cleanup()
    if since is None or since >= FS_SETTLE_SECONDS:
        return
    left = FS_SETTLE_SECONDS - since
    if wait:
        print(f"  waiting {left:.0f} s for the filesystem to settle after the last run", flush=True)
        time.sleep(left)
    else:
        print(
            f"  note: a benchmark deleted its files {since:.0f} s ago; ext4 creates files more"
            f" slowly for {FS_SETTLE_SECONDS} s after that (--at-rest waits)",
            flush=True,
        )


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start a target, load it, stop it; returns the figures."""
    settle_filesystem(args.at_rest)
    inst = start(kind, args)
    try:
        cpu0, busy0 = inst.cpu_seconds(), machine_busy_seconds()
        if args.generator == "smtp-source":
            if kind != "postfix":
                raise SystemExit("smtp-source cannot AUTH: use it with --target postfix")
            result = run_smtp_source(inst.port, args)
        else:
            result = asyncio.run(
                load(
                    target_of(inst, args),
                    sessions=args.sessions,
                    messages=args.messages,
                    size=args.size,
                    rate=args.rate,
                    new_connection=args.new_connection,
                )
            )
        result["server_cpu"] = inst.cpu_seconds() - cpu0
        result["machine_cpu"] = machine_busy_seconds() - busy0 - result["generator_cpu"]
        result["rss_mb"] = inst.rss_mb()
        time.sleep(0.5)  # Postfix's cleanup may still be renaming the last files
        result["stored"] = inst.stored()
        result["target"] = kind
        return result
    finally:
        inst.close()


def measure_idle(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Resident memory before, while `--idle` sessions are open, and after they closed
    (once per burst with --bursts): what a burst of connections leaves behind."""
    inst = start(kind, args)
    try:
        before = inst.rss_mb()
        during: list[float] = []
        after: list[float] = []

        async def hold() -> None:
            for _ in range(args.bursts):
                sessions = await hold_idle(target_of(inst, args), args.idle)
                during.append(inst.rss_mb())
                await close_all(sessions)
                await asyncio.sleep(IDLE_SETTLE)
                after.append(inst.rss_mb())

        asyncio.run(hold())
        return {
            "target": kind,
            "idle": args.idle,
            "rss_before": before,
            "rss_idle": max(during),
            "rss_after": after,
        }
    finally:
        inst.close()


IDLE_SETTLE = 5.0  # seconds after a burst closed before its leftover memory is measured


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    mode = "new connection per message" if args.new_connection else "connections reused"
    extras = ", STARTTLS" if args.tls and r["target"] == "smtpproxy" else ""
    auth = ", AUTH" if r["target"] == "smtpproxy" else ", no AUTH"
    print(
        f"[{r['target']}] generator={args.generator} sessions={args.sessions} "
        f"messages={args.messages} size={args.size} B ({mode}{extras}{auth})"
    )
    print(
        f"  accepted={r['accepted']} rejected={r['rejected']} elapsed={r['elapsed']:.2f}s "
        f"throughput={r['rate']:.0f} msgs/s"
        + (f" ({r['rate']:.0f} new sessions/s)" if args.new_connection else "")
    )
    if r["p50_ms"] is not None:
        print(f"  DATA-to-250 latency: p50={r['p50_ms']:.1f} ms p99={r['p99_ms']:.1f} ms")
    if r["accepted"]:
        n = r["accepted"]
        print(
            f"  CPU per message: {1000 * r['server_cpu'] / n:.2f} ms in {r['target']}'s "
            f"processes, {1000 * r['machine_cpu'] / n:.2f} ms machine-wide without the "
            f"generator; resident memory {r['rss_mb']:.0f} MB"
        )
    ok = r["stored"] == r["accepted"]
    where = "PostgreSQL" if r["target"] == "smtpproxy" else "the hold queue"
    print(
        f"  integrity: {r['stored']} messages in {where} for {r['accepted']} accepted "
        + ("OK" if ok else "MISMATCH")
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--size", type=int, default=10240)
    p.add_argument(
        "--rate", type=float, default=0, help="offered msgs/s in total (default: flat out)"
    )
    p.add_argument("--new-connection", action="store_true", help="one connection per message")
    p.add_argument("--tls", action="store_true", help="STARTTLS before AUTH")
    p.add_argument("--deliver", action="store_true", help="keep delivery consumers running")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run.processes of the smtpproxy under test",
    )
    p.add_argument("--target", choices=["smtpproxy", "postfix"], default="smtpproxy")
    p.add_argument("--generator", choices=["python", "smtp-source"], default="python")
    p.add_argument("--compare-postfix", action="store_true", help="then Postfix; the ratio")
    p.add_argument("--idle", type=int, default=0, help="hold N idle sessions; report memory")
    p.add_argument(
        "--bursts", type=int, default=1, help="with --idle: open and close them this many times"
    )
    p.add_argument(
        "--at-rest",
        action="store_true",
        help=f"wait until {FS_SETTLE_SECONDS} s after a benchmark last deleted its files",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="load a running instance instead")
    p.add_argument("--user", default="bench")
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the smtpproxy under test, e.g. SMTPPROXY_STORAGE_SYNC=fsync",
    )
    args = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    if args.port:
        password = sys.stdin.readline().strip() if args.password_stdin else ""
        target = Target(args.host, args.port, args.user, password, args.tls)
        r = asyncio.run(
            load(
                target,
                sessions=args.sessions,
                messages=args.messages,
                size=args.size,
                rate=args.rate,
                new_connection=args.new_connection,
            )
        )
        print(
            f"throughput={r['rate']:.0f} msgs/s p50={r['p50_ms']:.1f} ms p99={r['p99_ms']:.1f} ms"
        )
        return
    try:
        if args.idle:
            r = measure_idle(args.target, args)
            print(
                f"[{r['target']}] {r['idle']} idle sessions"
                f"{' (STARTTLS + AUTH)' if args.tls else ''}: resident memory "
                f"{r['rss_before']:.0f} MB before, {r['rss_idle']:.0f} MB while they are open, "
                f"after each burst closed: {', '.join(f'{m:.0f}' for m in r['rss_after'])} MB"
            )
            return
        results = [measure(args.target, args)]
        report(args, results[0])
        if args.compare_postfix:
            results.append(measure("postfix", args))
            report(args, results[1])
            ratio = results[0]["rate"] / results[1]["rate"]
            print(f"smtpproxy / postfix throughput: {ratio:.2f}x")
        if any(r["stored"] != r["accepted"] for r in results):
            sys.exit(1)
    except PostfixUnavailable as exc:
        sys.exit(f"cannot run the Postfix comparison: {exc}")


if __name__ == "__main__":
    main()
