"""The file provider: exact bytes and envelope on disk, durable before it reports, and
its batch writer (one thread call and one sync for the deliveries waiting) as a
concurrency primitive."""

from __future__ import annotations

import json
import time
from pathlib import Path

import attrs
import trio

from smtpproxy.delivery.providers.base import Delivery, ProviderSpec
from smtpproxy.delivery.providers.file import BatchWriter, FileProvider
from smtpproxy.models import OutcomeKind
from tests.support import deliveries
from tests.support.deliveries import opened, wire


class Writes:
    """A batch write that takes a while and records each batch; items named in fail
    get an OSError; the call numbered raise_on (1, 2, ...) raises."""

    def __init__(self, fail: frozenset[str] = frozenset(), raise_on: int = 0) -> None:
        self.batches: list[list[str]] = []
        self.fail = fail
        self.raise_on = raise_on

    def __call__(self, batch: list[Delivery]) -> list[OSError | None]:
        time.sleep(0.02)
        self.batches.append([d.message_id for d in batch])
        if len(self.batches) == self.raise_on:
            raise RuntimeError("disk on fire")
        return [OSError(28, "No space left") if d.message_id in self.fail else None for d in batch]


def numbered(i: int) -> Delivery:
    d = deliveries.delivery(wire(deliveries.message()), "b@example.org")
    return attrs.evolve(d, message_id=f"m{i}")


async def test_callers_arriving_together_share_batches_and_each_is_written_once() -> None:
    """Forty deliveries submitted over 80 ms: a few batches, each delivery in exactly one,
    and nobody returns before the batch holding it was written."""
    writes = Writes()
    writer = BatchWriter(writes)
    returned: list[tuple[str, int]] = []

    async def caller(i: int) -> None:
        await trio.sleep(i * 0.002)
        await writer.submit(numbered(i))
        returned.append((f"m{i}", len(writes.batches)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(caller, i)
    written = [m for batch in writes.batches for m in batch]
    assert sorted(written) == sorted(f"m{i}" for i in range(40))
    assert len(writes.batches) < 20  # one at a time would be forty
    for message_id, batches_done in returned:
        assert any(message_id in batch for batch in writes.batches[:batches_done])


async def test_a_failed_item_fails_only_its_caller() -> None:
    """An OSError for one delivery reaches that caller; the others of its batch succeed."""
    writer = BatchWriter(Writes(fail=frozenset({"m3"})))
    failed: list[int] = []

    async def caller(i: int) -> None:
        try:
            await writer.submit(numbered(i))
        except OSError:
            failed.append(i)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(caller, i)
    assert failed == [3]


async def test_a_batch_that_raises_fails_its_callers_and_the_next_one_is_written() -> None:
    """The second batch (two deliveries that queued behind the first) raises: the one
    that ran it gets the error, the other an OSError; a later delivery is written."""
    writes = Writes(raise_on=2)
    writer = BatchWriter(writes)
    outcomes: list[str] = []

    async def caller(i: int) -> None:
        try:
            await writer.submit(numbered(i))
            outcomes.append("ok")
        except OSError:
            outcomes.append("oserror")
        except RuntimeError:
            outcomes.append("raised")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(caller, i)
        await writer.submit(numbered(9))
    first, second = writes.batches[:2]  # trio starts the three in any order
    assert (len(first), len(second)) == (1, 2)
    assert sorted(first + second) == ["m0", "m1", "m2"]
    assert sorted(outcomes) == ["ok", "oserror", "raised"]
    assert writes.batches[-1] == ["m9"]


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
