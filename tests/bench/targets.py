"""What the ingest benchmark loads: a throwaway smtpproxy, or a private Postfix instance.

Both bind 127.0.0.1 on a free port, keep their state in a temporary directory (and,
for smtpproxy, its own database and Redis key prefix), and remove everything on close.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

from tests.support.process import SmtpProxyProcess, children, write_config

# ext4 skips recently deleted inodes when it allocates new ones, for up to 5 minutes
# after the deletion (docs/performance.md, "ext4 after deletions"): straight after a
# run removed its 20,000 files, the next run's file creations cost several times more
# and ingest measured ~15% lower (1,231 against 1,429 msgs/s at rest). Each target
# notes when it cleaned up.
LAST_CLEANUP = Path("/var/tmp/smtpproxy-bench-last-cleanup")
FS_SETTLE_SECONDS = 300


def note_cleanup() -> None:
    LAST_CLEANUP.write_text(f"{time.time()}\n")


def seconds_since_cleanup() -> float | None:
    """Seconds since a benchmark target last deleted its files, None if never."""
    try:
        return time.time() - float(LAST_CLEANUP.read_text())
    except (OSError, ValueError):
        return None


def machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages split between the processes sharing them, so
    the sum over a process tree is what it really occupies."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SmtpProxyInstance:
    """`smtpproxy run` with its own database, key prefix and data directory; delivery
    off unless `deliver`, so only ingest is measured. With processes > 1, one
    `smtpproxy run` serves with that many processes (run.processes). `settings` are merged
    into its config file (sections as dicts: a provider, delivery.concurrency, ...);
    restart() starts it again on the same database, queue and store with changes."""

    name = "smtpproxy"

    def __init__(
        self,
        admin_url: str,
        redis_url: str,
        *,
        tls: bool = False,
        deliver: bool = False,
        max_connections: int = 1000,
        env: dict[str, str] | None = None,
        processes: int = 1,
        settings: dict[str, Any] | None = None,
    ) -> None:
        from smtpproxy import admin
        from smtpproxy.config.passwords import hash_password
        from smtpproxy.db import migrate

        tag = secrets.token_hex(4)
        self.admin_url = admin_url
        self.dbname = f"smtpproxy_bench_{tag}"
        self.redis_url = redis_url
        self.prefix = f"smtpproxy-bench-{tag}"
        self.tmp = tempfile.TemporaryDirectory(prefix="smtpproxy-bench-", dir="/var/tmp")
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        info = psycopg.conninfo.conninfo_to_dict(admin_url)
        info["dbname"] = self.dbname
        self.url = psycopg.conninfo.make_conninfo(**info)
        migrate.migrate(self.url)
        self.user = "bench"
        self.password = secrets.token_urlsafe(12)
        with psycopg.connect(self.url, autocommit=True) as conn:
            admin.add_tenant(conn, "bench")
            admin.add_account(conn, "bench", "bench", hash_password(self.password), [])
        self._env = env or {}
        self._processes = processes
        self._settings: dict[str, Any] = {
            "data_dir": str(Path(self.tmp.name) / "data"),
            "smtp": {
                "listen": [f"127.0.0.1:{free_port() if processes > 1 else 0}"],
                "allow_plaintext_auth": not tls,
                "max_connections": max_connections,
                "max_connections_per_ip": max_connections,
            },
            "database": {"url": self.url, "pool_max": 10},
            "redis": {"url": redis_url, "key_prefix": self.prefix},
            "delivery": {"enabled": deliver},
            "health": {"listen": ""},
            "log": {"level": "WARNING"},
            "run": {"processes": processes},
        }
        self.procs: list[Any] = []
        self._start(settings or {})

    def _start(self, settings: dict[str, Any]) -> None:
        for section, values in settings.items():
            current = self._settings.get(section)
            if isinstance(values, dict) and isinstance(current, dict):
                self._settings[section] = {**current, **values}
            else:
                self._settings[section] = values
        config = write_config(Path(self.tmp.name) / "smtpproxy.toml", self._settings)
        # the bench reads the listening port from the log
        self.procs = [SmtpProxyProcess(config, {"SMTPPROXY_LOG_LEVEL": "INFO", **self._env})]
        primary = self.procs[0]
        primary.wait_ready(60)
        deadline = time.monotonic() + 60
        while sum(m.endswith(" ready") for m in primary.messages()) < self._expected():
            if time.monotonic() > deadline:
                raise RuntimeError("smtpproxy's workers did not start")
            time.sleep(0.05)
        self.port = primary.smtp_port
        self.pids = [primary.proc.pid, *children(primary.proc.pid)]

    def _expected(self) -> int:
        """The processes that report ready: SMTP ones, and delivery ones when delivering."""
        from smtpproxy.config import default_delivery_processes

        if not self._settings["delivery"].get("enabled", True):
            return self._processes
        run = self._settings.get("run", {})
        return self._processes + run.get("delivery_processes", default_delivery_processes())

    def restart(self, settings: dict[str, Any]) -> None:
        """Stop (SIGTERM) and start again with these settings merged in."""
        for proc in self.procs:
            proc.stop(signal.SIGTERM)
        self._start(settings)

    def count(self, status: str) -> int:
        """Messages PostgreSQL holds in this status."""
        with psycopg.connect(self.url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM messages WHERE status = %s", (status,)
            ).fetchone()
        return int(row[0]) if row else 0

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids)

    def rss_mb(self) -> float:
        return sum(rss_mb(pid) for pid in self.pids)

    def stored(self) -> int:
        """Messages PostgreSQL holds."""
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT count(*) FROM messages").fetchone()
        return int(row[0]) if row else 0

    def close(self, *, keep_files: list[tempfile.TemporaryDirectory[str]] | None = None) -> None:
        """Stop and remove everything; with keep_files, the data directory is added to
        that list instead of being deleted now (alternating runs delete theirs only at
        the end, so that no run starts in ext4's slow time after another's deletes)."""
        for proc in self.procs:
            proc.stop(signal.SIGTERM)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')
        client = redis.Redis.from_url(self.redis_url)
        for key in client.scan_iter(f"{self.prefix}*"):
            client.delete(key)
        client.close()
        if keep_files is not None:
            keep_files.append(self.tmp)
            return
        self.tmp.cleanup()
        note_cleanup()


# Postfix as a plain queueing smtpd: clients on 127.0.0.0/8 may relay, every message is
# put on hold (so no queue manager or delivery runs), no DNS, no per-client limits, no
# inflow throttling (in_flow_delay waits for a queue manager that is not running here).
_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydomain = localdomain
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_data_restrictions = check_client_access static:HOLD
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_peername_lookup = no
in_flow_delay = 0
maillog_file_prefixes = {root}
maillog_file = {root}/maillog
alias_maps =
alias_database =
local_recipient_maps =
biff = no
"""

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - {processes} smtpd
cleanup   unix  n - n - 0 cleanup
rewrite   unix  - - n - - trivial-rewrite
anvil     unix  - - n - 1 anvil
proxymap  unix  - - n - - proxymap
postlog   unix-dgram n - n - 1 postlogd
defer     unix  - - n - 0 bounce
bounce    unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
showq     unix  n - n - - showq
"""


# relaying: everything to one next hop (smtp-sink), no DNS; the queue manager and the
# SMTP client run, with Postfix's defaults for concurrency and connection reuse
_RELAY_MAIN_CF = """\
relayhost = [127.0.0.1]:{sink}
smtp_dns_support_level = disabled
smtp_host_lookup = native
default_transport = smtp
relay_transport = smtp
"""

_RELAY_MASTER_CF = """\
qmgr      unix  n - n 300 1 qmgr
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
scache    unix  - - n - 1 scache
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
"""


class PostfixUnavailable(RuntimeError):
    pass


class PostfixInstance:
    """A private Postfix (`postfix -c DIR start`) accepting into its queue on a free
    loopback port. Needs the Debian package `postfix` and root (Postfix drops to its
    mail_owner). Leaves the system's own Postfix configuration alone."""

    name = "postfix"

    def __init__(self, processes: int = 200, relay_to: int | None = None) -> None:
        """relay_to: a port on 127.0.0.1 to relay every message to (else: hold them)."""
        if shutil.which("postfix") is None:
            raise PostfixUnavailable("postfix is not installed (apt-get install postfix)")
        if os.geteuid() != 0:
            raise PostfixUnavailable("starting a private Postfix needs root")
        self.tmp = tempfile.TemporaryDirectory(prefix="smtpproxy-bench-postfix-", dir="/var/tmp")
        root = Path(self.tmp.name)
        root.chmod(0o755)  # Postfix's daemons run as its mail_owner
        self.conf = root / "conf"
        self.conf.mkdir()
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix")
        self.port = free_port()
        main_cf = _MAIN_CF.format(root=root)
        master_cf = _MASTER_CF.format(port=self.port, processes=processes)
        if relay_to is not None:
            main_cf = main_cf.replace(
                "smtpd_data_restrictions = check_client_access static:HOLD\n", ""
            )
            main_cf += _RELAY_MAIN_CF.format(sink=relay_to)
            master_cf += _RELAY_MASTER_CF
        (self.conf / "main.cf").write_text(main_cf)
        (self.conf / "master.cf").write_text(master_cf)
        self.queue = root / "queue"
        self.hold = root / "queue" / "hold"
        self._postfix("start")
        pid_file = root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 30
        while True:
            try:
                self.pid = int(pid_file.read_text().split()[0])
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except (OSError, ValueError, IndexError):
                if time.monotonic() > deadline:
                    raise PostfixUnavailable("postfix did not start: " + self._log_tail()) from None
                time.sleep(0.2)

    def _postfix(self, command: str) -> None:
        result = subprocess.run(
            ["postfix", "-c", str(self.conf), command],
            capture_output=True,
            text=True,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if result.returncode != 0 and command == "start":
            raise PostfixUnavailable(f"postfix start failed: {self._log_tail()}")

    def _log_tail(self) -> str:
        log = Path(self.tmp.name) / "maillog"
        return log.read_text()[-2000:] if log.exists() else "(no maillog)"

    def cpu_seconds(self) -> float:
        """The master, everything it reaped, and its live children."""
        total = _cpu_with_reaped(self.pid)
        for child in children(self.pid):
            total += process_cpu_seconds(child)
        return total

    def rss_mb(self) -> float:
        """Memory of the whole process tree (PSS: shared libraries counted once)."""
        return pss_mb(self.pid) + sum(pss_mb(c) for c in children(self.pid))

    def stored(self) -> int:
        """Messages in the hold queue."""
        return sum(len(files) for _root, _dirs, files in os.walk(self.hold))

    def queued(self) -> int:
        """Messages still in the queue (received, not yet delivered or bounced)."""
        return sum(
            len(files)
            for name in ("maildrop", "incoming", "active", "deferred", "hold")
            for _root, _dirs, files in os.walk(self.queue / name)
        )

    def sent(self) -> int:
        """Deliveries the log records as sent."""
        log = Path(self.tmp.name) / "maillog"
        return log.read_text().count(" status=sent ") if log.exists() else 0

    def close(self) -> None:
        """Stop Postfix and remove its files. Its queue files were deleted as it
        delivered them, so the filesystem's slow time after deletes starts now too."""
        self._postfix("stop")
        deadline = time.monotonic() + 15
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.tmp.cleanup()
        note_cleanup()


def _cpu_with_reaped(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
