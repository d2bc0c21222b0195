"""Never lose a message, never send one twice: the queue under real faults.

Redis is killed and restarted empty, PostgreSQL is cut off and comes back, a provider
fails for a while, two instances share the queue, and `smtpproxy run` is killed with
SIGKILL under load. Each test counts what the provider fake received per message id
(the `smtpproxy_id` custom argument) and compares it with what the SMTP clients were
told: every 250 is delivered, exactly once except across a crash between the
provider's acceptance and our record; nothing answered 451 is ever delivered.
"""

from __future__ import annotations

import collections
import os
import random
import signal
import smtplib
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from cryptography.fernet import Fernet

from smtpproxy import admin
from smtpproxy.config.crypto import SecretBox
from smtpproxy.runtime.service import Running
from tests.conftest import make_config
from tests.support import serving, smtp
from tests.support.fake_sendgrid import FakeSendGrid
from tests.support.faults import RedisProcess, TcpProxy
from tests.support.process import SmtpProxyProcess, children, running, write_config

pytestmark = pytest.mark.slow
run = trio.to_thread.run_sync
KEY = Fernet.generate_key().decode()

FAST = {
    "retry_schedule": ["200ms"],
    "scheduler_interval": "100ms",
    "reconcile_interval": "300ms",
    "reconcile_grace": "1s",
    "visibility_timeout": "3s",
    "shutdown_grace": "5s",
}


@pytest.fixture
def fake() -> Iterator[FakeSendGrid]:
    with FakeSendGrid(api_key="SG.fault") as f:
        yield f


@pytest.fixture
def routed(conn: psycopg.Connection[Any], account: dict[str, Any], fake: FakeSendGrid) -> None:
    """acme's mail goes to the SendGrid fake."""
    admin.add_provider(
        conn,
        "acme",
        "sg",
        "sendgrid",
        endpoint=fake.url,
        settings={},
        secret="SG.fault",
        encrypt=SecretBox(KEY.encode()).encrypt,
    )
    admin.add_route(
        conn,
        "acme",
        "sg",
        priority=None,
        sender_domain=None,
        recipient_domain=None,
        account_name=None,
    )


def deliveries(fake: FakeSendGrid) -> collections.Counter[str]:
    """How many times the provider accepted each message id."""
    return collections.Counter(
        r.body["custom_args"]["smtpproxy_id"] for r in fake.requests if r.accepted
    )


def try_send(port: int, password: str) -> tuple[str, str]:
    """('250', id) / ('451', '') / ('none', '') when the session broke before a reply."""
    try:
        code, reply = smtp.send(port, "app", password, smtp.message())
    except smtplib.SMTPResponseException as exc:  # refused before DATA (AUTH: 454, ...)
        return str(exc.smtp_code), ""
    except (smtplib.SMTPException, OSError):
        return "none", ""
    if code == 250:
        return "250", smtp.queued_id(reply)
    return str(code), ""


async def wait_delivered(fake: FakeSendGrid, ids: set[str], timeout: float = 30) -> None:
    with trio.fail_after(timeout):
        while not ids <= set(deliveries(fake)):
            await trio.sleep(0.1)


async def wait_recorded(pg_url: str, ids: set[str], timeout: float = 30) -> None:
    """Until every message in ids is delivered in PostgreSQL: the recorder commits the
    outcome after the provider's answer, so the fake having it is not enough."""
    with trio.fail_after(timeout):
        while True:
            with psycopg.connect(pg_url) as c:
                done = c.execute(
                    "SELECT count(*) FROM messages WHERE id = ANY(%s) AND status = 'delivered'",
                    (list(ids),),
                ).fetchone()
            if done == (len(ids),):
                return
            await trio.sleep(0.1)


@pytest.fixture
def pg_proxy(pg_url: str) -> Iterator[tuple[TcpProxy, str]]:
    """PostgreSQL through a proxy the test can cut: (the proxy, a URL through it)."""
    info = psycopg.conninfo.conninfo_to_dict(pg_url)
    with TcpProxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)) as proxy:
        yield proxy, psycopg.conninfo.make_conninfo(pg_url, host="127.0.0.1", port=str(proxy.port))


async def start_through(
    nursery: trio.Nursery, tmp_path: Path, via_proxy: str, redis_url: str, prefix: str
) -> tuple[Running, trio.Event]:
    """The service on PostgreSQL through pg_proxy, quick to notice it is gone."""
    database = {"url": via_proxy, "connect_timeout": "1s", "pool_min": 1, "pool_max": 4}
    return await start(nursery, tmp_path, via_proxy, redis_url, prefix, database=database)


async def start(
    nursery: trio.Nursery, tmp_path: Path, pg_url: str, redis_url: str, prefix: str, **sections: Any
) -> tuple[Running, trio.Event]:
    delivery = {**FAST, **sections.pop("delivery", {})}
    cfg = make_config(
        tmp_path,
        pg_url,
        redis_url,
        prefix,
        delivery=delivery,
        security={"secret_key": KEY},
        **sections,
    )
    return await serving.start(nursery, cfg)


async def test_redis_restarted_empty_loses_nothing(
    tmp_path: Path,
    pg_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
    nursery: trio.Nursery,
) -> None:
    """Messages queued when Redis dies empty are rebuilt from PostgreSQL and delivered;
    while Redis is down clients get 451 (and those are never delivered); when it is back,
    ingress and delivery continue without a restart."""
    with RedisProcess(tmp_path / "redis") as redis_server:
        running, stop = await start(
            nursery,
            tmp_path,
            pg_url,
            redis_server.url,
            key_prefix,
            delivery={"enabled": False},
            redis={"url": redis_server.url, "key_prefix": key_prefix, "socket_timeout": "1s"},
            smtp={"enqueue_retry_delays": ["100ms", "200ms", "300ms"]},
        )
        port = running.smtp[0][1]
        before = [await run(lambda: try_send(port, account["password"])) for _ in range(5)]
        redis_server.kill()
        during = [await run(lambda: try_send(port, account["password"])) for _ in range(2)]
        assert running.health is not None
        _, ready = await run(lambda: serving.readiness(running.health[1]))
        redis_server.start()  # empty
        after = [await run(lambda: try_send(port, account["password"])) for _ in range(3)]
        stop.set()
        # a delivering instance on the rebuilt Redis
        _, stop2 = await start(
            nursery,
            tmp_path,
            pg_url,
            redis_server.url,
            key_prefix,
            redis={"url": redis_server.url, "key_prefix": key_prefix},
        )
        accepted = {mid for code, mid in before + after if code == "250"}
        await wait_delivered(fake, accepted)
        stop2.set()
    assert [c for c, _ in before + after] == ["250"] * 8
    assert [c for c, _ in during] == ["451", "451"]
    assert "redis" in ready["failing"]
    counts = deliveries(fake)
    assert set(counts) == accepted  # the 451s were never delivered
    assert set(counts.values()) == {1}


async def test_postgresql_outage_means_451_then_recovery(
    tmp_path: Path,
    pg_proxy: tuple[TcpProxy, str],
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
    nursery: trio.Nursery,
) -> None:
    """With PostgreSQL unreachable, ingress answers 451 (after AUTH: 454) and readiness
    names it; when it is back, new connections are made and everything flows again."""
    proxy, via_proxy = pg_proxy
    running, stop = await start_through(nursery, tmp_path, via_proxy, redis_url, key_prefix)
    port = running.smtp[0][1]
    assert running.health is not None
    first = await run(lambda: try_send(port, account["password"]))
    await wait_delivered(fake, {first[1]})
    proxy.down()
    during = await run(lambda: try_send(port, account["password"]))
    await trio.sleep(1.1)
    _, ready = await run(lambda: serving.readiness(running.health[1]))
    proxy.up()
    with trio.fail_after(30):
        while True:
            after = await run(lambda: try_send(port, account["password"]))
            if after[0] == "250":
                break
            await trio.sleep(0.5)
    await wait_delivered(fake, {after[1]})
    stop.set()
    assert first[0] == "250"
    assert during[0] in ("451", "454")
    assert "postgresql" in ready["failing"]
    assert set(deliveries(fake).values()) == {1}


async def test_a_frozen_database_gets_451_in_time_and_late_rows_are_never_sent(
    tmp_path: Path,
    pg_url: str,
    pg_proxy: tuple[TcpProxy, str],
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
    nursery: trio.Nursery,
) -> None:
    """PostgreSQL hangs (a network partition: nothing answers, nothing is refused):
    clients get 451 within smtp.commit_timeout. When it answers again, the inserts that
    were abandoned may commit after all; their rows are refused (enqueue_failed) and
    never delivered, and new mail flows."""
    proxy, via_proxy = pg_proxy
    database = {"url": via_proxy, "connect_timeout": "1s", "pool_min": 1, "pool_max": 4}
    running, stop = await start(
        nursery,
        tmp_path,
        via_proxy,
        redis_url,
        key_prefix,
        database=database,
        smtp={"commit_timeout": "3s"},
    )
    port = running.smtp[0][1]
    first = await run(lambda: try_send(port, account["password"]))  # AUTH is cached now
    await wait_delivered(fake, {first[1]})
    proxy.freeze()
    started = trio.current_time()
    during = [await run(lambda: try_send(port, account["password"])) for _ in range(2)]
    took = trio.current_time() - started
    proxy.thaw()
    with trio.fail_after(60):
        while True:
            after = await run(lambda: try_send(port, account["password"]))
            if after[0] == "250":
                break
            await trio.sleep(0.5)
        await wait_delivered(fake, {after[1]})
        while True:  # the abandoned inserts are refused once they end
            with psycopg.connect(pg_url) as c:
                live = c.execute(
                    "SELECT count(*) FROM messages WHERE status NOT IN ('delivered',"
                    " 'enqueue_failed')"
                ).fetchone()
            if live == (0,):
                break
            await trio.sleep(0.2)
    await trio.sleep(3 * 1.5)  # past the reconcile grace: nothing refused comes back
    stop.set()
    assert [code for code, _ in during] == ["451", "451"]
    assert took < 2 * (3 + 2)
    assert set(deliveries(fake)) == {first[1], after[1]}


async def test_outage_while_recording_does_not_send_again(
    tmp_path: Path,
    pg_url: str,
    pg_proxy: tuple[TcpProxy, str],
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
    nursery: trio.Nursery,
) -> None:
    """PostgreSQL goes away between the provider's acceptance and our record of it, for
    longer than the visibility timeout: the stream entry is reclaimed meanwhile, but the
    message is not claimed and sent again while its consumer is alive and still trying
    to record the outcome; once the database is back the one delivery is recorded."""
    proxy, via_proxy = pg_proxy
    cut = threading.Event()

    def cut_once(record: Any) -> None:
        if record.accepted and not cut.is_set():
            cut.set()
            proxy.down()

    fake.before_reply = cut_once
    running, stop = await start_through(nursery, tmp_path, via_proxy, redis_url, key_prefix)
    code, mid = await run(lambda: try_send(running.smtp[0][1], account["password"]))
    assert code == "250"
    with trio.fail_after(10):
        while not cut.is_set():
            await trio.sleep(0.05)
    await trio.sleep(3 * 3)  # 3 visibility timeouts: the entry is reclaimed meanwhile
    proxy.up()
    await serving.wait_status(pg_url, mid, "delivered", timeout=30)
    await trio.sleep(2)  # anything that would send it again has had its chance
    stop.set()
    assert deliveries(fake) == {mid: 1}
    with psycopg.connect(pg_url) as c:
        logged = c.execute(
            "SELECT status, count(*) FROM delivery_logs WHERE message_id = %s GROUP BY 1", (mid,)
        ).fetchall()
    assert logged == [("delivered", 1)]


async def test_provider_failing_for_a_while_then_recovering(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
    nursery: trio.Nursery,
) -> None:
    """429 and 503 answers are retried on the durable schedule until the provider
    recovers; every message is delivered once and every failed attempt is logged."""
    for status in (429, 503) * 4:
        fake.respond_with(status, headers={"Retry-After": "0"} if status == 429 else None)
    running, stop = await start(
        nursery, tmp_path, pg_url, redis_url, key_prefix, delivery={"breaker_threshold": 100}
    )
    port = running.smtp[0][1]
    sent = [await run(lambda: try_send(port, account["password"])) for _ in range(4)]
    ids = {mid for _, mid in sent}
    await wait_recorded(pg_url, ids)  # recorded, not only sent: the row comes after the answer
    stop.set()
    assert set(deliveries(fake).values()) == {1}
    with psycopg.connect(pg_url) as c:
        retries = c.execute(
            "SELECT count(*) FROM delivery_logs WHERE status = 'retrying'"
        ).fetchone()
        delivered = c.execute("SELECT count(*) FROM messages WHERE status = 'delivered'").fetchone()
    assert retries == (8,)
    assert delivered == (4,)


def process_config(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    prefix: str,
    name: str,
    smtp: dict[str, Any] | None = None,
    delivery: dict[str, Any] | None = None,
    *,
    run: dict[str, Any] | None = None,
    health: int = 0,
) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        {
            "data_dir": str(tmp_path / "shared-data"),  # one store, as on shared storage
            "smtp": smtp or {"listen": ["127.0.0.1:0"]},
            "database": {"url": pg_url},
            "redis": {"url": redis_url, "key_prefix": prefix},
            "health": {"listen": f"127.0.0.1:{health}"},
            "security": {"secret_key": KEY},
            "delivery": {**FAST, "concurrency": 8} if delivery is None else delivery,
            "run": run or {},
        },
    )


async def test_two_instances_share_the_queue_without_double_delivery(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
) -> None:
    """Two `smtpproxy run` processes on one PostgreSQL and Redis, sharing one SMTP port
    (smtp.reuse_port): the kernel gives sessions to both, mail accepted by either is
    delivered exactly once, and both do deliveries."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        shared = {"listen": [f"127.0.0.1:{probe.getsockname()[1]}"], "reuse_port": True}
    procs = [
        SmtpProxyProcess(process_config(tmp_path, pg_url, redis_url, key_prefix, n, shared))
        for n in ("one", "two")
    ]
    try:
        for p in procs:
            await run(p.wait_ready)
        port = procs[0].smtp_port
        assert procs[1].smtp_port == port
        results = [await run(lambda: try_send(port, account["password"])) for _ in range(40)]
        ids = {mid for code, mid in results if code == "250"}
        await wait_delivered(fake, ids)
        await wait_recorded(pg_url, ids)  # recorded, not left to the drain
    finally:
        codes = [await run(p.stop) for p in procs]
    assert codes == [0, 0]
    assert len(ids) == 40
    assert set(deliveries(fake).values()) == {1}
    sessions = [sum(m == "SMTP session ended" for m in p.messages()) for p in procs]
    assert sum(sessions) == 40 and all(sessions), sessions
    busy = [sum("delivered in" in m for m in p.messages()) for p in procs]
    assert sum(busy) == 40 and all(busy), busy


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def by_worker(proc: SmtpProxyProcess, message: str) -> collections.Counter[int]:
    return collections.Counter(
        int(r.get("worker", -1)) for r in proc.lines if r.get("msg") == message
    )


async def test_one_run_command_serves_with_two_processes(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
) -> None:
    """`run.processes = 2`: `smtpproxy run` starts a second process that shares the
    SMTP port and delivers too; mail accepted by either is delivered exactly once; the
    health endpoint adds up both processes' counters; a worker killed with SIGKILL is
    started again; SIGTERM stops both, cleanly."""
    port, health = free_port(), free_port()
    config = process_config(
        *(tmp_path, pg_url, redis_url, key_prefix, "two", {"listen": [f"127.0.0.1:{port}"]}),
        run={"processes": 2, "delivery_processes": 0},
        health=health,
    )
    proc = SmtpProxyProcess(config)
    try:
        await run(proc.wait_ready)
        with trio.fail_after(60):
            while await run(lambda: http_status(health, "/readyz")) != 200:
                await trio.sleep(0.1)  # the worker is ready too
        [worker] = children(proc.proc.pid)
        ids, merged, own = await send_and_scrape(40, port, health, account, fake)

        os.kill(worker, signal.SIGKILL)
        with trio.fail_after(60):
            while children(proc.proc.pid) in ([], [worker]):
                await trio.sleep(0.1)
            while await run(lambda: http_status(health, "/readyz")) != 200:
                await trio.sleep(0.1)
        [restarted] = children(proc.proc.pid)
        again = await run(lambda: try_send(port, account["password"]))
        await wait_delivered(fake, {again[1]})
    finally:
        code = await run(proc.stop)
    assert code == 0
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the primary
        os.kill(restarted, 0)
    assert len(ids) == 40
    assert set(deliveries(fake).values()) == {1}
    assert "smtpproxy_processes 2" in merged.splitlines()
    accepted = "smtpproxy_messages_accepted_total"
    assert sample(merged, accepted) == 40
    assert 0 < sample(own, accepted) < 40  # the worker accepted the rest
    sessions = by_worker(proc, "SMTP session ended")
    assert sessions[0] + sessions[1] == 41 and sessions[0] and sessions[1], sessions
    assert any("worker 1 exited unexpectedly" in m for m in proc.messages("ERROR"))


async def test_a_delivery_process_delivers_beside_the_smtp_process(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
) -> None:
    """`run.delivery_processes = 1`: `smtpproxy run` starts a process that binds no SMTP
    port and does every delivery, while the primary accepts every session and delivers
    nothing; it reports ready only with its delivery process; the health endpoint adds
    up both; the delivery process killed with SIGKILL is started again and delivers the
    mail accepted meanwhile; SIGTERM stops both, cleanly."""
    port, health = free_port(), free_port()
    config = process_config(
        *(tmp_path, pg_url, redis_url, key_prefix, "split", {"listen": [f"127.0.0.1:{port}"]}),
        run={"delivery_processes": 1},
        health=health,
    )
    proc = SmtpProxyProcess(config)
    try:
        await run(proc.wait_ready)
        assert await run(lambda: http_status(health, "/readyz")) == 200  # worker included
        [worker] = children(proc.proc.pid)
        ids, merged, own = await send_and_scrape(20, port, health, account, fake)

        os.kill(worker, signal.SIGKILL)
        later = {(await run(lambda: try_send(port, account["password"])))[1] for _ in range(5)}
        await wait_delivered(fake, later)
        await wait_recorded(pg_url, later)  # recorded, not left to the drain
        [restarted] = children(proc.proc.pid)
    finally:
        code = await run(proc.stop)
    assert code == 0
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the primary
        os.kill(restarted, 0)
    assert restarted != worker
    assert len(ids) == 20
    assert set(deliveries(fake).values()) == {1}
    assert "smtpproxy_processes 2" in merged.splitlines()
    assert sample(merged, "smtpproxy_deliveries_total") == 20
    assert sample(own, "smtpproxy_deliveries_total") == 0  # the primary delivers nothing
    assert sample(own, "smtpproxy_messages_accepted_total") == 20
    assert set(by_worker(proc, "SMTP session ended")) == {0}
    delivered = collections.Counter(
        int(r.get("worker", -1)) for r in proc.lines if "delivered in" in str(r.get("msg"))
    )
    assert set(delivered) == {1} and delivered[1] == 25, delivered
    assert any("worker 1 exited unexpectedly" in m for m in proc.messages("ERROR"))
    assert not any("worker 1 exited unexpectedly (code 0)" in m for m in proc.messages())


async def test_a_worker_stops_when_its_primary_is_killed(
    tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None
) -> None:
    """SIGKILL to the primary: its delivery process notices and exits on its own
    (nobody is left to stop it)."""
    config = process_config(
        tmp_path, pg_url, redis_url, key_prefix, "orphan", run={"delivery_processes": 1}
    )
    proc = SmtpProxyProcess(config)
    try:
        await run(proc.wait_ready)
        [worker] = children(proc.proc.pid)
        proc.proc.kill()
        with trio.fail_after(30):
            while running(worker):
                await trio.sleep(0.1)
    finally:
        await run(proc.stop)
    assert any("the primary process exited: stopping" in m for m in proc.messages("WARNING"))


async def send_and_scrape(
    count: int, port: int, health: int, account: dict[str, Any], fake: FakeSendGrid
) -> tuple[set[str], str, str]:
    """Send count messages, wait until each is delivered and recorded; the ids of those
    that got 250, then the health endpoint's /metrics (every process) and
    /metrics/process."""
    results = [await run(lambda: try_send(port, account["password"])) for _ in range(count)]
    ids = {mid for code, mid in results if code == "250"}
    await wait_delivered(fake, ids)
    # the recorder commits, counts and logs a delivery after the provider's answer: until
    # all are counted, a scrape comes up short, and a process killed next would take
    # unrecorded deliveries (to be sent again) and their "delivered in" lines with it
    with trio.fail_after(30):
        while True:
            merged = await run(lambda: serving.get_text(health))
            if sample(merged, "smtpproxy_deliveries_total") >= len(ids):
                break
            await trio.sleep(0.1)
    own = await run(lambda: serving.get_text(health, "/metrics/process"))
    return ids, merged, own


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def sample(text: str, series: str) -> float:
    """The sum of a metric's series (over its labels) in an exposition."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith((series + " ", series + "{"))
    )


async def test_sigkill_under_load_loses_nothing_and_duplicates_at_most_once_per_kill(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    account: dict[str, Any],
    routed: None,
    fake: FakeSendGrid,
) -> None:
    """`smtpproxy run`, with the default delivery timings, is killed with SIGKILL at
    random moments while clients send; after the last restart every message that got a
    250 is delivered within 30 s (the dead processes' work is taken over once their
    heartbeats lapse, not after the 5-minute visibility timeout), nothing that got a
    451 is, and a message is delivered twice only when a kill fell between the
    provider's acceptance and our record: at most once per message, and only for
    deliveries that were in flight when a kill fell (at most `delivery.concurrency` per
    kill)."""
    config = process_config(tmp_path, pg_url, redis_url, key_prefix, "victim", delivery={})
    rng = random.Random(20261128)
    outcomes: list[tuple[str, str]] = []
    kills = 3
    proc = SmtpProxyProcess(config)
    for _ in range(kills):
        await run(proc.wait_ready)
        port = proc.smtp_port
        stop_clients = threading.Event()

        def client(port: int = port, stop_clients: threading.Event = stop_clients) -> None:
            while not stop_clients.is_set():
                outcomes.append(try_send(port, account["password"]))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        await trio.sleep(rng.uniform(0.5, 2.0))
        await run(lambda p=proc: p.stop(signal.SIGKILL))
        stop_clients.set()
        for t in threads:
            await run(t.join)
        proc = SmtpProxyProcess(config)
    try:
        await run(proc.wait_ready)
        accepted = {mid for code, mid in outcomes if code == "250"}
        await wait_delivered(fake, accepted, timeout=30)
        # a delivery a kill cut off before its record is sent and recorded again by the
        # last process once the heartbeat lapses: wait for the rows, not only the fake
        await wait_recorded(pg_url, accepted, timeout=60)
        await trio.sleep(12)  # past a heartbeat lifetime: anything taken over is done
    finally:
        await run(proc.stop)
    counts = deliveries(fake)
    assert accepted, "the clients got no 250 at all"
    refused = [c for c, _ in outcomes if c.startswith("4")]
    assert refused == [] or all(c in ("421", "451", "454") for c in refused)
    with psycopg.connect(pg_url) as c:
        rows = dict(c.execute("SELECT id, status FROM messages").fetchall())
    # everything delivered is a message we know; a 250 always is; an unanswered session
    # (killed mid-DATA) may or may not have committed
    assert set(counts) <= set(rows)
    assert accepted <= set(counts)
    assert max(counts.values()) <= 2
    assert sum(n - 1 for n in counts.values()) <= kills * 32  # delivery.concurrency
    assert all(rows[mid] == "delivered" for mid in accepted)
