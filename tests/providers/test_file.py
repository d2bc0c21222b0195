"""The file provider: exact bytes and envelope on disk, durable before it reports, and
its group sync (one syncfs for the deliveries in flight) as a concurrency primitive."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import trio

from smtpproxy.delivery.providers.base import ProviderSpec
from smtpproxy.delivery.providers.file import FileProvider, GroupSync
from smtpproxy.models import OutcomeKind
from tests.support import deliveries
from tests.support.deliveries import opened, wire


class Recorder:
    """A sync function that takes a while and records when each call ran."""

    def __init__(self, seconds: float = 0.02, fail: int = 0) -> None:
        self.seconds = seconds
        self.fail = fail  # the first `fail` calls raise OSError
        self.calls: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def __call__(self) -> None:
        start = time.monotonic()
        time.sleep(self.seconds)
        with self._lock:
            self.calls.append((start, time.monotonic()))
            if len(self.calls) <= self.fail:
                raise OSError(5, "Input/output error")


async def test_every_caller_waits_for_a_sync_that_started_after_it() -> None:
    """Forty callers arriving over time share few syncs, and each returns only after a
    sync that began after its own call finished."""
    recorder = Recorder()
    group = GroupSync(recorder)
    spans: list[tuple[float, float]] = []

    async def caller(delay: float) -> None:
        await trio.sleep(delay)
        called = time.monotonic()
        await group.sync()
        spans.append((called, time.monotonic()))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(caller, i * 0.002)
    assert len(spans) == 40
    assert len(recorder.calls) < 20  # shared: forty one-by-one syncs would be forty
    for called, returned in spans:
        assert any(called <= start and end <= returned for start, end in recorder.calls)


async def test_a_failed_sync_fails_its_callers_and_the_next_one_succeeds() -> None:
    """OSError from the sync reaches the caller; a later call syncs again."""
    recorder = Recorder(seconds=0.0, fail=1)
    group = GroupSync(recorder)
    with trio.fail_after(10):
        with pytest.raises(OSError, match="Input/output error"):
            await group.sync()
        await group.sync()
    assert len(recorder.calls) == 2


def provider(path: Path) -> FileProvider:
    return FileProvider(ProviderSpec(name="outbox", type="file", settings={"path": str(path)}))


async def test_concurrent_deliveries_land_with_exact_bytes_and_envelope(tmp_path: Path) -> None:
    """Thirty deliveries at once: each .eml holds the exact bytes, each .json the
    envelope, no temporary file is left, every outcome names its file."""
    bodies = {
        f"m{i}": wire(deliveries.message(subject=f"n{i}", text=f"body {i}\n")) for i in range(30)
    }
    outcomes = {}
    async with opened(provider(tmp_path / "out")) as p:

        async def one(message_id: str) -> None:
            d = deliveries.delivery(
                bodies[message_id], "bob@example.org", mail_from="a@example.com"
            )
            outcomes[message_id] = await p.send(
                type(d)(message_id, d.tenant_id, d.account_id, d.mail_from, d.recipients, d.body)
            )

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for message_id in bodies:
                    nursery.start_soon(one, message_id)
    for message_id, body in bodies.items():
        assert outcomes[message_id].kind == OutcomeKind.DELIVERED
        assert outcomes[message_id].provider_message_id == f"{message_id}.eml"
        assert (tmp_path / "out" / f"{message_id}.eml").read_bytes() == body
        envelope = json.loads((tmp_path / "out" / f"{message_id}.json").read_text())
        assert envelope["rcpt_to"] == ["bob@example.org"]
        assert envelope["mail_from"] == "a@example.com"
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")) == []


async def test_an_unwritable_directory_is_a_retry(tmp_path: Path) -> None:
    """A path that is a file, not a directory: retry, naming the directory."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    async with opened(provider(blocker / "out")) as p:
        with trio.fail_after(10):
            outcome = await p.send(deliveries.delivery(wire(deliveries.message()), "b@example.org"))
    assert outcome.kind == OutcomeKind.RETRY
    assert outcome.detail.startswith(f"cannot write to {blocker / 'out'}")
