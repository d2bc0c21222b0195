"""Message stores: one contract run against LocalStore and S3Store, then what only one
backend can do wrong (file modes, temp files, full and read-only disks; missing buckets,
unreachable endpoints, key prefixes), and open_store's choice of backend.

S3 is moto in server mode on 127.0.0.1 (tests/support/s3.py); every AWS setting in the
environment is replaced by dummies, so no test can reach a real AWS endpoint.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpproxy.config import structure
from smtpproxy.errors import BodyNotFound, StoreError, StoreUnavailable
from smtpproxy.ids import new_message_id
from smtpproxy.store import MessageStore, key_for, open_store
from smtpproxy.store.local import LocalStore
from smtpproxy.store.s3 import S3Store
from tests.support.aws import no_real_aws
from tests.support.mounts import TMPFS_SIZE, remount_read_only, small_tmpfs
from tests.support.net import closed_port
from tests.support.s3 import MotoS3

PREFIX = "msgs/"
MAIL = (
    b"From: a@example.com\r\nTo: b@example.net\r\nSubject: =?utf-8?q?h=C3=A9?=\r\n\r\n"
    b"caf\xc3\xa9 \xff\xfe\x00 8-bit\r\n.\r\n..dots\r\n"
)
ALL_BYTES = bytes(range(256)) * 4


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    no_real_aws(monkeypatch, tmp_path, AWS_SESSION_TOKEN="testing", AWS_DEFAULT_REGION="us-east-1")


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture
def bucket(moto: MotoS3) -> Iterator[str]:
    name = moto.new_bucket()
    yield name
    moto.drop_bucket(name)


def _s3_store(moto: MotoS3, bucket: str, prefix: str = PREFIX) -> S3Store:
    return S3Store(bucket, prefix=prefix, endpoint=moto.endpoint, **moto.credentials)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MessageStore:
    """The same contract, once per backend."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    moto: MotoS3 = request.getfixturevalue("moto")
    return _s3_store(moto, request.getfixturevalue("bucket"))


def _plant_foreign(store: MessageStore, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Put bodies next to the store (not in it) the way another user of the disk or bucket
    would: a sibling directory, or other key prefixes in the same bucket."""
    if isinstance(store, LocalStore):
        other = tmp_path / "other" / "ab" / "cd"
        other.mkdir(parents=True)
        (other / "foreign.eml").write_bytes(b"not ours")
        return
    moto: MotoS3 = request.getfixturevalue("moto")
    assert isinstance(store, S3Store)
    for key in ("other/ab/cd/foreign.eml", "msgs-old/x.eml", "foreign.eml"):
        moto.s3.put_object(Bucket=store.bucket, Key=key, Body=b"not ours")


def _files(base: Path) -> list[str]:
    """Every regular file under base, relative to it."""
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())


# -- the contract, both backends ---------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [MAIL, ALL_BYTES, b"", b"\r\n", b"x" * 300_000],
    ids=["mail", "8bit", "empty", "crlf", "big"],
)
def test_put_get_round_trip_is_byte_exact(store: MessageStore, body: bytes) -> None:
    """What put stored, get returns byte for byte: 8-bit, NUL, CRLF, empty and large bodies."""
    store.put("ab/cd/round.eml", body)
    assert store.get("ab/cd/round.eml") == body


def test_put_many_stores_every_body(store: MessageStore) -> None:
    """put_many of 50 distinct bodies: each comes back under its own key."""
    items = [
        (key_for(new_message_id()), f"body {i}\r\n".encode() + ALL_BYTES[:i]) for i in range(50)
    ]
    store.put_many(items)
    for key, body in items:
        assert store.get(key) == body


def test_put_many_of_nothing_is_a_no_op(store: MessageStore) -> None:
    """An empty batch stores nothing and raises nothing."""
    store.put_many([])
    assert list(store.iter_objects()) == []


def test_put_overwrites_an_existing_key(store: MessageStore) -> None:
    """A second put under the same key replaces the body, also with a shorter one."""
    store.put("ab/cd/same.eml", b"first, and rather long " * 100)
    store.put("ab/cd/same.eml", b"second")
    assert store.get("ab/cd/same.eml") == b"second"
    assert [o.key for o in store.iter_objects()] == ["ab/cd/same.eml"]


def test_get_of_a_missing_key_raises_body_not_found(store: MessageStore) -> None:
    """A key never stored raises BodyNotFound, which is also a KeyError and a StoreError."""
    assert issubclass(BodyNotFound, KeyError)
    assert issubclass(BodyNotFound, StoreError)
    with pytest.raises(BodyNotFound) as info:
        store.get("zz/yy/never.eml")
    assert isinstance(info.value, KeyError)
    assert "zz/yy/never.eml" in str(info.value)
    with pytest.raises(KeyError):
        store.get("zz/yy/never-either.eml")


def test_delete_is_idempotent_and_removes_the_body(store: MessageStore) -> None:
    """delete removes a body; deleting it again, or a key never stored, is no error."""
    store.put("ab/cd/gone.eml", MAIL)
    store.put("ab/cd/kept.eml", b"kept")
    store.delete("ab/cd/gone.eml")
    with pytest.raises(BodyNotFound):
        store.get("ab/cd/gone.eml")
    store.delete("ab/cd/gone.eml")
    store.delete("qq/rr/never-stored.eml")
    assert store.get("ab/cd/kept.eml") == b"kept"
    assert [o.key for o in store.iter_objects()] == ["ab/cd/kept.eml"]


def test_iter_objects_lists_each_stored_body_once(
    store: MessageStore, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """iter_objects: each stored key once, right size, recent mtime; nothing beside the store."""
    _plant_foreign(store, request, tmp_path)
    bodies = {key_for(new_message_id()): b"y" * i for i in range(0, 40, 3)}
    bodies["top-level.eml"] = MAIL
    store.put_many(list(bodies.items()))
    store.delete(next(iter(bodies)))
    del bodies[next(iter(bodies))]
    now = time.time()
    objects = list(store.iter_objects())
    assert sorted(o.key for o in objects) == sorted(bodies)
    for obj in objects:
        assert obj.size == len(bodies[obj.key])
        assert abs(obj.mtime - now) < 60


def test_iter_objects_of_an_empty_store_is_empty(store: MessageStore) -> None:
    """A fresh store lists nothing."""
    assert list(store.iter_objects()) == []


def test_check_passes_on_a_working_store(store: MessageStore) -> None:
    """check() raises nothing when the store can take writes."""
    store.check()
    store.put("ab/cd/x.eml", b"x")
    store.check()


def test_describe_says_where_the_bodies_are(store: MessageStore, tmp_path: Path) -> None:
    """describe() names the directory, or the bucket and prefix."""
    text = store.describe()
    if isinstance(store, LocalStore):
        assert str(tmp_path / "store") in text
    else:
        assert isinstance(store, S3Store)
        assert store.bucket in text
        assert PREFIX in text


def test_key_for_fans_out_two_levels(
    store: MessageStore, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """key_for keys sit two directories (key prefixes) deep, one per character of the
    id's tail, so bodies spread over 32 x 32 = 1,024 directories."""
    mid = "01J0000000000000000000WXYZ"
    key = key_for(mid)
    assert key == f"z/y/{mid}.eml"
    other = key_for("01J0000000000000000000ABCD")
    assert other.split("/")[:2] == ["d", "c"]
    store.put(key, MAIL)
    store.put(other, b"other")
    assert store.get(key) == MAIL
    assert store.get(other) == b"other"
    if isinstance(store, LocalStore):
        base = tmp_path / "store"
        assert (base / "z").is_dir()
        assert (base / "z" / "y").is_dir()
        assert (base / "z" / "y" / f"{mid}.eml").read_bytes() == MAIL
        assert (base / "d" / "c").is_dir()
    else:
        assert isinstance(store, S3Store)
        moto: MotoS3 = request.getfixturevalue("moto")
        assert sorted(moto.keys(store.bucket)) == sorted([PREFIX + key, PREFIX + other])
        listing = moto.s3.list_objects_v2(Bucket=store.bucket, Prefix=PREFIX, Delimiter="/")
        assert sorted(p["Prefix"] for p in listing["CommonPrefixes"]) == ["msgs/d/", "msgs/z/"]


def test_concurrent_puts_of_distinct_keys(store: MessageStore) -> None:
    """Eight threads storing their own bodies at once: every body is stored intact."""
    batches = [
        [(f"{t:02x}/{i % 4:02x}/{t}-{i}.eml", bytes([65 + t]) * (1000 + i)) for i in range(15)]
        for t in range(8)
    ]
    errors: list[BaseException] = []

    def worker(batch: list[tuple[str, bytes]]) -> None:
        try:
            store.put_many(batch[:10])
            for key, body in batch[10:]:
                store.put(key, body)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for batch in batches:
        for key, body in batch:
            assert store.get(key) == body
    assert len(list(store.iter_objects())) == 8 * 15


def test_concurrent_puts_of_the_same_key(
    store: MessageStore, request: pytest.FixtureRequest
) -> None:
    """Threads overwriting one key at once all succeed and leave one of their bodies whole."""
    bodies = [bytes([65 + t]) * (65536 + t) for t in range(8)]
    errors: list[BaseException] = []

    def worker(body: bytes) -> None:
        for _ in range(20):
            try:
                store.put("ab/cd/same.eml", body)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [str(e) for e in errors] == []
    assert store.get("ab/cd/same.eml") in bodies
    assert [o.key for o in store.iter_objects()] == ["ab/cd/same.eml"]


# -- local files -------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o077, 0o000, 0o022], ids=oct)
def test_local_files_are_0640_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    """Every body file is created with mode 0640, whether the umask would narrow or widen it."""
    store = LocalStore(tmp_path / "store")
    old = os.umask(umask)
    try:
        store.put("ab/cd/one.eml", MAIL)
        store.put_many([("ab/cd/two.eml", b"2"), ("ef/gh/three.eml", b"3")])
    finally:
        os.umask(old)
    for name in ("ab/cd/one.eml", "ab/cd/two.eml", "ef/gh/three.eml"):
        assert stat.S_IMODE((tmp_path / "store" / name).stat().st_mode) == 0o640, name


@pytest.mark.parametrize("sync", ["syncfs", "fsync"])
def test_local_put_many_leaves_no_temp_files(tmp_path: Path, sync: str) -> None:
    """After put_many the directory holds exactly the stored bodies: no temp files."""
    store = LocalStore(tmp_path / "store", sync=sync)
    items = [(key_for(new_message_id()), b"m%d" % i) for i in range(30)]
    store.put_many(items)
    store.put("ab/cd/single.eml", MAIL)
    assert _files(tmp_path / "store") == sorted([k for k, _ in items] + ["ab/cd/single.eml"])


def test_local_fsync_mode_round_trips(tmp_path: Path) -> None:
    """With sync = "fsync" bodies are stored, read back, listed and deleted as usual."""
    store = LocalStore(tmp_path / "store", sync="fsync")
    assert store.sync == "fsync"
    assert "fsync" in store.describe()
    items = [(key_for(new_message_id()), ALL_BYTES[i:]) for i in range(10)]
    store.put_many(items)
    store.put("ab/cd/one.eml", b"")
    for key, body in items:
        assert store.get(key) == body
    assert store.get("ab/cd/one.eml") == b""
    assert len(list(store.iter_objects())) == 11
    store.delete("ab/cd/one.eml")
    with pytest.raises(BodyNotFound):
        store.get("ab/cd/one.eml")


def test_local_base_directory_is_created_with_parents(tmp_path: Path) -> None:
    """A base path whose parents do not exist yet is created whole, and is usable."""
    base = tmp_path / "a" / "b" / "c"
    store = LocalStore(base)
    assert base.is_dir()
    store.check()
    store.put("ab/cd/x.eml", b"x")
    assert (base / "ab" / "cd" / "x.eml").read_bytes() == b"x"


def test_local_base_that_is_a_regular_file_is_unavailable(tmp_path: Path) -> None:
    """A base path that is a regular file (or lies under one) raises StoreUnavailable."""
    (tmp_path / "file").write_bytes(b"I am not a directory")
    with pytest.raises(StoreUnavailable):
        LocalStore(tmp_path / "file")
    with pytest.raises(StoreUnavailable):
        LocalStore(tmp_path / "file" / "store")
    assert (tmp_path / "file").read_bytes() == b"I am not a directory"


def test_local_check_fails_when_the_base_directory_disappears(tmp_path: Path) -> None:
    """check() raises StoreUnavailable once the base directory is gone."""
    store = LocalStore(tmp_path / "store")
    shutil.rmtree(tmp_path / "store")
    with pytest.raises(StoreUnavailable):
        store.check()


def test_local_fanout_directory_blocked_by_a_file(tmp_path: Path) -> None:
    """A file where a key's directory must go: StoreUnavailable, written bodies rolled back."""
    base = tmp_path / "store"
    store = LocalStore(base)
    (base / "ab").write_bytes(b"blocker")
    with pytest.raises(StoreUnavailable):
        store.put("ab/cd/x.eml", MAIL)
    with pytest.raises(StoreUnavailable):
        store.put_many([("ok/aa/1.eml", b"1"), ("ok/bb/2.eml", b"2"), ("ab/cd/3.eml", b"3")])
    for key in ("ok/aa/1.eml", "ok/bb/2.eml"):
        with pytest.raises(BodyNotFound):
            store.get(key)
    assert _files(base) == ["ab"]
    assert (base / "ab").read_bytes() == b"blocker"


def test_local_put_many_with_an_unwritable_name_rolls_back(tmp_path: Path) -> None:
    """A file name over 255 bytes fails the whole batch: StoreUnavailable, no body remains."""
    base = tmp_path / "store"
    store = LocalStore(base)
    store.put("ab/cd/before.eml", b"before")
    items = [("ab/cd/1.eml", b"1"), ("ab/cd/" + "x" * 300 + ".eml", b"long"), ("ab/ef/3.eml", b"3")]
    with pytest.raises(StoreUnavailable):
        store.put_many(items)
    assert _files(base) == ["ab/cd/before.eml"]
    assert store.get("ab/cd/before.eml") == b"before"


@pytest.mark.parametrize("key", ["../escape.eml", "ab/../../escape.eml", "/tmp/escape.eml"])
def test_local_keys_cannot_escape_the_base_directory(tmp_path: Path, key: str) -> None:
    """A key that would leave the base directory is refused before anything is written."""
    store = LocalStore(tmp_path / "store")
    with pytest.raises(ValueError, match="escapes"):
        store.put(key, b"x")
    with pytest.raises(ValueError, match="escapes"):
        store.get(key)
    assert not (tmp_path / "escape.eml").exists()
    assert _files(tmp_path) == []


# -- local files on a small tmpfs: full and read-only ------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 256 KiB tmpfs mounted for this test, unmounted afterwards."""
    with small_tmpfs(tmp_path) as mnt:
        yield mnt


def _bodies_too_big_for_tmpfs() -> list[tuple[str, bytes]]:
    return [(f"f{i % 3}/aa/{i}.eml", bytes([i]) * (64 * 1024)) for i in range(8)]  # 512 KiB


def test_local_full_disk_fails_the_batch(tmpfs: Path) -> None:
    """Disk full: put_many raises StoreUnavailable, keeps none of the batch, store still works."""
    store = LocalStore(tmpfs / "store")
    store.put("ok/aa/before.eml", b"before")
    items = _bodies_too_big_for_tmpfs()
    with pytest.raises(StoreUnavailable, match="ENOSPC"):
        store.put_many(items)
    for key, _ in items:
        with pytest.raises(BodyNotFound):
            store.get(key)
    assert store.get("ok/aa/before.eml") == b"before"
    store.put("ok/aa/after.eml", b"after")
    assert store.get("ok/aa/after.eml") == b"after"


@pytest.mark.parametrize("sync", ["syncfs", "fsync"])
def test_local_full_disk_leaves_no_temp_files(tmpfs: Path, sync: str) -> None:
    """Disk full: no half-written temp file of the batch remains; the space is given back."""
    store = LocalStore(tmpfs / "store", sync=sync)
    free_before = shutil.disk_usage(tmpfs).free
    with pytest.raises(StoreUnavailable):
        store.put_many(_bodies_too_big_for_tmpfs())
    assert _files(tmpfs / "store") == []
    assert [o.key for o in store.iter_objects()] == []
    assert shutil.disk_usage(tmpfs).free == free_before


def test_local_check_reports_too_little_free_space(tmpfs: Path) -> None:
    """check() raises StoreUnavailable when free space is below min_free_bytes, not above."""
    LocalStore(tmpfs / "store", min_free_bytes=TMPFS_SIZE // 4).check()
    with pytest.raises(StoreUnavailable, match="bytes free"):
        LocalStore(tmpfs / "store", min_free_bytes=TMPFS_SIZE + 1).check()
    store = LocalStore(tmpfs / "store", min_free_bytes=TMPFS_SIZE // 2)
    store.check()
    store.put("ab/cd/big.eml", b"z" * (TMPFS_SIZE * 3 // 4))
    with pytest.raises(StoreUnavailable):
        store.check()


def test_local_read_only_disk_is_unavailable(tmpfs: Path) -> None:
    """Read-only disk: writes, deletes and check() raise StoreUnavailable; reads still work."""
    store = LocalStore(tmpfs / "store")
    store.put("ab/cd/old.eml", MAIL)
    remount_read_only(tmpfs)
    with pytest.raises(StoreUnavailable, match="EROFS"):
        store.put("ab/cd/new.eml", b"new")  # directory exists already
    with pytest.raises(StoreUnavailable, match="EROFS"):
        store.put("xy/zw/new.eml", b"new")  # directory must be created
    with pytest.raises(StoreUnavailable):
        store.put_many([("ab/cd/n1.eml", b"1"), ("ab/cd/n2.eml", b"2")])
    with pytest.raises(StoreUnavailable):
        store.delete("ab/cd/old.eml")
    with pytest.raises(StoreUnavailable):
        store.check()
    assert store.get("ab/cd/old.eml") == MAIL
    assert [o.key for o in store.iter_objects()] == ["ab/cd/old.eml"]


# -- S3 ----------------------------------------------------------------------------------


def test_s3_missing_bucket_is_unavailable(moto: MotoS3) -> None:
    """Missing bucket: every operation raises StoreUnavailable, get not BodyNotFound."""
    store = _s3_store(moto, "no-such-bucket-anywhere")
    with pytest.raises(StoreUnavailable, match="no-such-bucket-anywhere"):
        store.check()
    with pytest.raises(StoreUnavailable):
        store.put("ab/cd/x.eml", b"x")
    with pytest.raises(StoreUnavailable):
        store.put_many([(f"ab/cd/{i}.eml", b"%d" % i) for i in range(5)])
    with pytest.raises(StoreUnavailable) as info:
        store.get("ab/cd/x.eml")
    assert not isinstance(info.value, BodyNotFound)
    with pytest.raises(StoreUnavailable):
        store.delete("ab/cd/x.eml")
    with pytest.raises(StoreUnavailable):
        list(store.iter_objects())
    assert "no-such-bucket-anywhere" not in [b["Name"] for b in moto.s3.list_buckets()["Buckets"]]


@pytest.mark.parametrize("operation", ["put", "put_many", "get", "delete", "check", "iter_objects"])
def test_s3_unreachable_endpoint_is_unavailable(operation: str) -> None:
    """Nothing listening at the endpoint: StoreUnavailable (not botocore's) within 30 s."""
    store = S3Store(
        "bucket",
        prefix=PREFIX,
        endpoint=f"http://127.0.0.1:{closed_port()}",
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    calls = {
        "put": lambda: store.put("ab/cd/x.eml", b"x"),
        "put_many": lambda: store.put_many([("ab/cd/1.eml", b"1"), ("ab/cd/2.eml", b"2")]),
        "get": lambda: store.get("ab/cd/x.eml"),
        "delete": lambda: store.delete("ab/cd/x.eml"),
        "check": store.check,
        "iter_objects": lambda: list(store.iter_objects()),
    }
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        calls[operation]()
    assert time.monotonic() - started < 30
    assert type(info.value) is StoreUnavailable


@pytest.mark.parametrize("prefix", ["a/b", "a/b/", "/a/b/"])
def test_s3_prefix_is_prepended_and_stripped(moto: MotoS3, bucket: str, prefix: str) -> None:
    """Prefix "a/b", however slashed: objects at "a/b/<key>", listed back without it."""
    store = _s3_store(moto, bucket, prefix=prefix)
    keys = [key_for(new_message_id()) for _ in range(3)] + ["top.eml"]
    store.put_many([(k, k.encode()) for k in keys])
    moto.s3.put_object(Bucket=bucket, Key="a/bc/not-ours.eml", Body=b"no")
    moto.s3.put_object(Bucket=bucket, Key="a/not-ours.eml", Body=b"no")
    assert sorted(moto.keys(bucket, "a/b/")) == sorted(f"a/b/{k}" for k in keys)
    assert sorted(o.key for o in store.iter_objects()) == sorted(keys)
    for k in keys:
        assert store.get(k) == k.encode()
        assert moto.s3.get_object(Bucket=bucket, Key=f"a/b/{k}")["Body"].read() == k.encode()


def test_s3_without_prefix_uses_bare_keys(moto: MotoS3, bucket: str) -> None:
    """With no prefix a key is the object's name as it is."""
    store = _s3_store(moto, bucket, prefix="")
    store.put("ab/cd/x.eml", b"x")
    assert moto.keys(bucket) == ["ab/cd/x.eml"]
    assert [o.key for o in store.iter_objects()] == ["ab/cd/x.eml"]
    assert "(none)" in store.describe()


def test_s3_lists_more_than_one_page(moto: MotoS3, bucket: str) -> None:
    """iter_objects follows pagination: 1,050 bodies (over S3's 1,000 per page) all listed."""
    store = _s3_store(moto, bucket)
    keys = [f"{i % 7}/{i % 11}/{i}.eml" for i in range(1050)]
    store.put_many([(k, b"p") for k in keys])
    listed = [o.key for o in store.iter_objects()]
    assert len(listed) == len(keys)
    assert sorted(listed) == sorted(keys)


def test_s3_stores_bodies_as_message_rfc822(moto: MotoS3, bucket: str) -> None:
    """An object written by put carries Content-Type message/rfc822 and the exact bytes."""
    store = _s3_store(moto, bucket)
    store.put("ab/cd/x.eml", MAIL)
    obj = moto.s3.get_object(Bucket=bucket, Key=PREFIX + "ab/cd/x.eml")
    assert obj["ContentType"] == "message/rfc822"
    assert obj["Body"].read() == MAIL


def test_s3_iter_objects_skips_folder_markers(moto: MotoS3, bucket: str) -> None:
    """Zero-byte "folder" objects (the prefix itself, "msgs/ab/") are not listed as bodies."""
    store = _s3_store(moto, bucket)
    store.put("ab/cd/x.eml", b"x")
    moto.s3.put_object(Bucket=bucket, Key=PREFIX, Body=b"")
    moto.s3.put_object(Bucket=bucket, Key=PREFIX + "ab/", Body=b"")
    assert [o.key for o in store.iter_objects()] == ["ab/cd/x.eml"]


def test_s3_put_many_against_a_missing_bucket_raises(moto: MotoS3) -> None:
    """put_many that cannot write raises StoreUnavailable, for one item and for many."""
    store = _s3_store(moto, "no-such-bucket-either")
    with pytest.raises(StoreUnavailable):
        store.put_many([("ab/cd/only.eml", b"1")])
    with pytest.raises(StoreUnavailable):
        store.put_many([(key_for(new_message_id()), b"%d" % i) for i in range(20)])


# -- open_store --------------------------------------------------------------------------


def test_open_store_local(tmp_path: Path) -> None:
    """storage.type = "local" opens a LocalStore on storage.path with the configured sync."""
    cfg = structure(
        {
            "data_dir": str(tmp_path / "data"),
            "storage": {"type": "local", "path": str(tmp_path / "bodies"), "sync": "fsync"},
        }
    )
    store = open_store(cfg)
    assert isinstance(store, LocalStore)
    assert store.base == tmp_path / "bodies"
    assert store.sync == "fsync"
    assert store.min_free_bytes == cfg.smtp.max_message_size
    store.put("ab/cd/x.eml", MAIL)
    assert (tmp_path / "bodies" / "ab" / "cd" / "x.eml").read_bytes() == MAIL


def test_open_store_local_defaults_to_data_dir(tmp_path: Path) -> None:
    """Without storage.path the local store lives in <data_dir>/messages."""
    store = open_store(structure({"data_dir": str(tmp_path / "data")}))
    assert isinstance(store, LocalStore)
    assert store.base == tmp_path / "data" / "messages"
    assert store.base.is_dir()


def test_open_store_s3(moto: MotoS3, bucket: str) -> None:
    """storage.type = "s3" opens an S3Store on the configured bucket, prefix and endpoint."""
    cfg = structure(
        {
            "storage": {
                "type": "s3",
                "s3_bucket": bucket,
                "s3_prefix": "bodies",
                "s3_endpoint": moto.endpoint,
                "s3_region": "us-east-1",
                "s3_access_key_id": "testing",
                "s3_secret_access_key": "testing",
            }
        }
    )
    store = open_store(cfg)
    assert isinstance(store, S3Store)
    assert bucket in store.describe()
    assert moto.endpoint in store.describe()
    store.check()
    store.put("ab/cd/x.eml", MAIL)
    assert moto.keys(bucket) == ["bodies/ab/cd/x.eml"]
    assert store.get("ab/cd/x.eml") == MAIL
