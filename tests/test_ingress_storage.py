"""What SMTP clients see when the message store fails: 451, never a crash or a 5xx,
and readiness reports the store; on S3 as on local disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from smtpproxy.runtime.service import Running
from tests.conftest import make_config
from tests.support import smtp
from tests.support.faults import TcpProxy
from tests.support.mounts import remount_read_only, small_tmpfs
from tests.support.s3 import MotoS3
from tests.support.serving import readiness, start

run = trio.to_thread.run_sync


async def send(running: Running, password: str, size: int = 0) -> tuple[int, bytes]:
    data = smtp.message(body="x" * size + "\n" if size else "hello\n")
    return await run(lambda: smtp.send(running.smtp[0][1], "app", password, data))


def count(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM messages WHERE status <> 'enqueue_failed'"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, size=512 * 1024) as mnt:
        yield mnt


async def test_full_disk_means_451_and_not_ready(
    tmpfs: Path,
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """When the store's disk fills up, clients get 451 (no crash, no 5xx), no row is
    written for the refused message, and /readyz names the store."""
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        storage={"path": str(tmpfs / "messages")},
        smtp={"max_message_size": "128KiB"},
    )
    running, stop = await start(nursery, cfg)
    assert running.health is not None
    codes = []
    with trio.fail_after(60):
        for _ in range(8):  # 8 x ~100 KiB into 512 KiB
            code, _ = await send(running, account["password"], size=100 * 1024)
            codes.append(code)
        await trio.sleep(1.1)  # past the readiness cache
        status, body = await run(lambda: readiness(running.health[1]))
    stop.set()
    assert 250 in codes and 451 in codes
    assert set(codes) == {250, 451}
    assert count(pg_url) == codes.count(250)
    assert status == 503 and body["failing"] == ["store"]


async def test_read_only_disk_means_451(
    tmpfs: Path,
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
) -> None:
    """A store directory on a file system remounted read-only gets 451 and readiness 503."""
    cfg = make_config(tmp_path, pg_url, redis_url, key_prefix, storage={"path": str(tmpfs / "m")})
    running, stop = await start(nursery, cfg)
    assert running.health is not None
    remount_read_only(tmpfs)
    with trio.fail_after(30):
        code, reply = await send(running, account["password"])
        await trio.sleep(1.1)
        status, body = await run(lambda: readiness(running.health[1]))
    stop.set()
    assert code == 451 and b"4.3.0" in reply
    assert status == 503 and body["failing"] == ["store"]
    assert count(pg_url) == 0


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as s3:
        yield s3


async def test_s3_store_accepts_and_delivers(
    moto: MotoS3,
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With storage.type = "s3" the body lands in the bucket before the 250, delivery reads
    it back, and when the bucket goes away clients get 451."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = moto.new_bucket()
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        key_prefix,
        storage={
            "type": "s3",
            "s3_bucket": bucket,
            "s3_prefix": "mail",
            "s3_endpoint": moto.endpoint,
            "s3_region": "us-east-1",
            "s3_access_key_id": "testing",
            "s3_secret_access_key": "testing",
        },
        delivery={"default_route": "outbox"},
    )
    running, stop = await start(nursery, cfg)
    with trio.fail_after(60):
        code, reply = await send(running, account["password"])
        assert code == 250
        mid = smtp.queued_id(reply)
        keys = [o["Key"] for o in moto.s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert any(k.startswith("mail/") and k.endswith(f"{mid}.eml") for k in keys)
        while not (tmp_path / "outbox" / f"{mid}.eml").exists():
            await trio.sleep(0.05)
        moto.drop_bucket(bucket)
        code, reply = await send(running, account["password"])
    stop.set()
    assert code == 451 and b"4.3.0" in reply


async def test_a_frozen_store_gets_451_within_the_commit_timeout(
    moto: MotoS3,
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With S3 frozen (requests hang, as in a network partition), every client gets 451
    within smtp.commit_timeout, none of those messages is ever stored or delivered, and
    mail flows again within seconds of S3 coming back."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = moto.new_bucket()
    host, port = moto.endpoint.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        cfg = make_config(
            tmp_path,
            pg_url,
            redis_url,
            key_prefix,
            smtp={"commit_timeout": "3s"},
            storage={
                "type": "s3",
                "s3_bucket": bucket,
                "s3_endpoint": f"http://127.0.0.1:{proxy.port}",
                "s3_region": "us-east-1",
                "s3_access_key_id": "testing",
                "s3_secret_access_key": "testing",
            },
            delivery={"default_route": "outbox"},
        )
        running, stop = await start(nursery, cfg)
        with trio.fail_after(120):
            code, reply = await send(running, account["password"])
            assert code == 250  # warm: S3 works
            warm = smtp.queued_id(reply)
            proxy.freeze()
            results: list[tuple[int, bytes, float]] = []

            async def client() -> None:
                started = trio.current_time()
                code, reply = await send(running, account["password"])
                results.append((code, reply, trio.current_time() - started))

            async with trio.open_nursery() as clients:
                for _ in range(3):
                    clients.start_soon(client)
            proxy.thaw()
            await trio.sleep(5)  # hung requests complete now: nothing of theirs may land
            code, reply = await send(running, account["password"])
            back = smtp.queued_id(reply) if code == 250 else ""
            # the warm message too: its delivery may have read its body during the freeze
            while back and not all(
                (tmp_path / "outbox" / f"{mid}.eml").exists() for mid in (warm, back)
            ):
                await trio.sleep(0.05)
        stop.set()
    assert [r[0] for r in results] == [451, 451, 451], results
    assert all(b"4.3.0" in r[1] for r in results)
    assert max(r[2] for r in results) < 3 + 2  # the timeout, and the SMTP round trips
    assert code == 250
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert rows == (2,)  # the message before the freeze, and the one after
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 2
    assert len(moto.keys(bucket)) == 2  # bodies that landed late were removed
