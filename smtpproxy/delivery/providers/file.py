"""The `file` provider: writes each delivery into a directory, for development and tests.

For every delivery it writes `<message id>.eml` (the exact bytes received over SMTP)
and `<message id>.json` (the envelope), each atomically (temp file + rename), so a
reader never sees half a message. No network, no secret.

A delivery is reported only once its files are durable. Deliveries in flight share
the cost (GroupSync): each writes its files, then waits for one syncfs(2) of the
directory's file system that started after its writes, so a batch of deliveries costs
one sync, not two fsyncs each (where syncfs is missing: fsync of the files and the
directory, per delivery).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import trio

from smtpproxy.delivery.providers.base import Delivery, ProviderSpec, ProviderType, SettingInfo
from smtpproxy.models import Outcome
from smtpproxy.runtime.libc import HAS_SYNCFS, syncfs


class GroupSync:
    """One sync for many writers: sync() returns once a sync that started after the
    call has finished (so it covers every write made before the call); callers that
    arrive while one runs share the next one."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._started = 0  # syncs started so far
        self._finished = 0  # the last sync (by number) that finished without error
        self._running = False
        self._changed = trio.Event()

    async def sync(self) -> None:
        needed = self._started + 1  # one still running started before our writes
        while self._finished < needed:
            if self._running:
                await self._changed.wait()
                continue
            self._running = True
            self._started += 1
            number = self._started
            try:
                await trio.to_thread.run_sync(self._sync)
                self._finished = number
            finally:
                self._running = False
                self._changed.set()
                self._changed = trio.Event()


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, *, fsync: bool) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with tmp.open("wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    tmp.replace(path)


class FileProvider:
    def __init__(self, spec: ProviderSpec) -> None:
        self.spec = spec
        self.directory = Path(spec.require("path"))
        self._group = GroupSync(lambda: syncfs(self.directory)) if HAS_SYNCFS else None

    def _write(self, delivery: Delivery) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        envelope = {
            "message_id": delivery.message_id,
            "mail_from": delivery.mail_from,
            "rcpt_to": list(delivery.recipients),
            "tenant_id": delivery.tenant_id,
            "account_id": delivery.account_id,
        }
        per_file = self._group is None
        _write_atomic(self.directory / f"{delivery.message_id}.eml", delivery.body, fsync=per_file)
        _write_atomic(
            self.directory / f"{delivery.message_id}.json",
            json.dumps(envelope, indent=2).encode() + b"\n",
            fsync=per_file,
        )
        if per_file:  # the renames
            _fsync_path(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        return f"{delivery.message_id}.eml"

    async def send(self, delivery: Delivery) -> Outcome:
        try:
            name = await trio.to_thread.run_sync(self._write, delivery)
            if self._group is not None:
                await self._group.sync()
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
