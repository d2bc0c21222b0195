"""The `file` provider: writes each delivery into a directory, for development and tests.

For every delivery it writes `<message id>.eml` (the exact bytes received over SMTP)
and `<message id>.json` (the envelope), each atomically (temp file + rename), so a
reader never sees half a message. No network, no secret.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import trio

from smtpproxy.delivery.providers.base import Delivery, ProviderSpec, ProviderType, SettingInfo
from smtpproxy.models import Outcome


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class FileProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.directory = Path(spec.require("path"))

    def _write(self, delivery: Delivery) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        envelope = {
            "message_id": delivery.message_id,
            "mail_from": delivery.mail_from,
            "rcpt_to": list(delivery.recipients),
            "tenant_id": delivery.tenant_id,
            "account_id": delivery.account_id,
        }
        _write_atomic(self.directory / f"{delivery.message_id}.eml", delivery.body)
        _write_atomic(
            self.directory / f"{delivery.message_id}.json",
            json.dumps(envelope, indent=2).encode() + b"\n",
        )
        return f"{delivery.message_id}.eml"

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            name = await trio.to_thread.run_sync(self._write, delivery)
        except OSError as exc:
            return Outcome.retry(f"cannot write to {self.directory}: {exc.strerror}")
        return Outcome.delivered(name)

    async def aclose(self) -> None:
        return None


TYPE = ProviderType(
    name="file",
    factory=FileProvider,
    settings={"path": SettingInfo("directory the .eml and .json files are written to", True)},
)
