"""The self-signed certificate made on first use, when several processes share a data
directory and start at once (smtp.reuse_port, systemd smtpproxy@N units)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_START = """
import sys
from smtpproxy.config import structure
from smtpproxy.ingress import tls
cfg = structure({"data_dir": sys.argv[1], "smtp": {"hostname": "race.test"}})
tls.ServerTls(cfg)  # loads the pair: fails on one process's cert with another's key
print("ok")
"""


def test_processes_starting_together_share_one_certificate(tmp_path: Path) -> None:
    """Eight processes make the pair at the same moment: every one loads a matching
    certificate and key (before, some loaded one process's certificate with another's
    key and failed to start)."""
    for _ in range(3):
        data = tmp_path / f"data-{_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _START, str(data)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        results = [p.communicate(timeout=60) for p in procs]
        assert [out.strip() for out, _ in results] == ["ok"] * 8, [e for _, e in results]
        assert sorted(p.name for p in (data / "tls").iterdir()) == [
            ".lock",
            "selfsigned.crt",
            "selfsigned.key",
        ]
