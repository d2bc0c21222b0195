"""`smtpproxy run` on the embedded PostgreSQL and Redis (the newcomer's setup) with a
delivery process: both processes share the primary's servers, and stopping leaves no
server behind."""

from __future__ import annotations

import signal
from pathlib import Path

import trio
from cryptography.fernet import Fernet

from tests.support.process import SmtpProxyProcess, proc_files, write_config


def processes_using(directory: Path) -> list[int]:
    """Processes whose command line names directory (the embedded servers')."""
    return [pid for pid, cmdline in proc_files("cmdline") if str(directory).encode() in cmdline]


async def test_embedded_servers_are_shared_with_the_delivery_process_and_stopped(
    tmp_path: Path,
) -> None:
    """The delivery process uses the primary's embedded servers (it logs none of its
    own starting), and after SIGTERM no PostgreSQL or Redis of that data directory is
    left running."""
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "smtpproxy.toml",
        {
            "data_dir": str(data),
            "run": {"delivery_processes": 1},
            "smtp": {"listen": ["127.0.0.1:0"]},
            "database": {"url": "embedded"},
            "redis": {"url": "embedded"},
            "health": {"listen": "127.0.0.1:0"},
            "security": {"secret_key": Fernet.generate_key().decode()},
            "delivery": {"default_route": "outbox"},
            "providers": {"outbox": {"type": "file", "path": str(tmp_path / "outbox")}},
        },
    )
    proc = SmtpProxyProcess(config)
    try:
        await trio.to_thread.run_sync(lambda: proc.wait_ready(120))
        assert processes_using(data / "postgres")  # running, for both processes
        assert any(m == "worker 1 ready" for m in proc.messages())
    finally:
        code = await trio.to_thread.run_sync(lambda: proc.stop(signal.SIGTERM, 60))
    assert code == 0
    starting = [m for m in proc.messages() if m.startswith("starting embedded")]
    assert len(starting) == 2, starting  # PostgreSQL and Redis, by the primary only
    with trio.fail_after(30):
        while processes_using(data / "postgres") or processes_using(data / "redis"):
            await trio.sleep(0.2)
