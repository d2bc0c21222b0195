"""Running `smtpproxy run` as a real process for end-to-end tests.

The process is started with the test's config file, its JSON log lines are collected by
a reader thread, and the bound SMTP and health ports are read from them (the config
asks for port 0). stop() sends a signal and returns the exit code.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.cli import command

_SMTP = re.compile(r"SMTP listening on (\S+):(\d+)")
_HEALTH = re.compile(r"health endpoint on http://(\S+):(\d+)/")


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """A TOML file from nested dicts of strings, numbers, booleans and lists."""

    def value(v: Any) -> str:
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    for section, table in cfg.items():
        if not isinstance(table, dict):
            continue
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if scalars:
            lines.append(f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
        for name, sub in table.items():
            if isinstance(sub, dict):
                lines.append(f"[{section}.{name}]")
                lines += [f"{k} = {value(v)}" for k, v in sub.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class SmtpProxyProcess:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.smtp_port = 0
        self.health_port = 0
        self._ready = threading.Event()
        self._ended = False
        full_env = {**os.environ, **(env or {})}
        full_env.pop("SMTPPROXY_CONFIG", None)
        self.proc = subprocess.Popen(
            command(config, "run"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.raw.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self.lines.append(record)
            msg = str(record.get("msg", ""))
            if m := _SMTP.search(msg):
                self.smtp_port = self.smtp_port or int(m.group(2))
            if m := _HEALTH.search(msg):
                self.health_port = int(m.group(2))
            if msg == "smtpproxy ready":
                self._ready.set()
        self._ended = True  # the output closed: the process is exiting
        self._ready.set()

    def wait_ready(self, timeout: float = 30) -> None:
        """Blocking: until the process says it is ready (or dies: its output closing
        before it said so counts, even if it has not been reaped yet)."""
        if not self._ready.wait(timeout) or self._ended or self.proc.poll() is not None:
            raise RuntimeError("smtpproxy did not start:\n" + "".join(self.raw[-30:]))

    def messages(self, level: str | None = None) -> list[str]:
        return [str(r.get("msg")) for r in self.lines if level is None or r.get("level") == level]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Blocking: signal the process and wait for its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        self._reader.join(timeout=5)
        code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def running(pid: int) -> bool:
    """Whether a process is still running: neither gone nor exited and waiting to be
    reaped (state Z in /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def proc_files(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, contents of /proc/PID/name) for every process there is; one that ends
    while this reads is left out."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            yield int(entry.name), (entry / name).read_bytes()
        except OSError:  # gone meanwhile
            continue


def children(pid: int) -> list[int]:
    """The processes pid started and that are still there (their parent pid in /proc)."""
    return [
        child
        for child, stat in proc_files("stat")
        if int(stat.rsplit(b")", 1)[1].split()[1]) == pid
    ]
