"""The running service: health endpoint, graceful drain, supervision of crashed services."""

from __future__ import annotations

import shutil
import smtplib
from typing import Any

import trio

from smtpproxy.config import Config
from smtpproxy.runtime.supervise import supervise
from tests.conftest import Service
from tests.support import smtp
from tests.support.serving import get_json

run = trio.to_thread.run_sync


async def test_health_and_readiness(service: Service, cfg: Config) -> None:
    """/healthz is alive; /readyz is ready, then 503 naming the store when it disappears."""
    with trio.fail_after(20):
        assert await run(lambda: get_json(service.health_port, "/healthz")) == (
            200,
            {"status": "alive"},
        )
        status, body = await run(lambda: get_json(service.health_port, "/readyz"))
        assert status == 200
        assert body["checks"] == {
            "postgresql": "ok",
            "redis": "ok",
            "store": "ok",
            "listeners": "ok",
            "queue": "ok",
        }
        shutil.rmtree(cfg.storage_path)
        await trio.sleep(1.1)  # past the readiness cache
        status, body = await run(lambda: get_json(service.health_port, "/readyz"))
    assert status == 503
    assert body["failing"] == ["store"]
    assert body["checks"]["store"].startswith("error:")


async def test_health_rejects_other_paths_and_methods(service: Service) -> None:
    """Unknown paths are 404, other methods 405."""
    with trio.fail_after(20):
        assert (await run(lambda: get_json(service.health_port, "/nope")))[0] == 404
        assert (await run(lambda: get_json(service.health_port, "/healthz", "POST")))[0] == 405


async def test_drain_finishes_data_in_progress_and_refuses_new_sessions(
    service: Service, account: dict[str, Any]
) -> None:
    """After stop: readiness says draining, a DATA already started still gets 250, and a
    new session gets 421."""
    data = smtp.message()

    def start_transaction() -> smtplib.SMTP:
        c = smtp.connect(service.smtp_port)
        smtp.login(c, "app", account["password"])
        c.mail("alice@example.com")
        c.rcpt("bob@example.org")
        code, _ = c.docmd("DATA")
        assert code == 354
        c.send(data[:50])  # half the message
        return c

    def finish(c: smtplib.SMTP) -> tuple[int, bytes]:
        c.send(data[50:] + b".\r\n")
        reply = c.getreply()
        c.close()
        return reply

    def new_session() -> int:
        try:
            smtplib.SMTP("127.0.0.1", service.smtp_port, timeout=5)
        except smtplib.SMTPConnectError as exc:
            return exc.smtp_code
        return 220

    with trio.fail_after(30):
        client = await run(start_transaction)
        service.stop.set()
        await trio.sleep(0.3)
        status, body = await run(lambda: get_json(service.health_port, "/readyz"))
        assert (status, body) == (503, {"status": "draining"})
        assert await run(new_session) == 421
        code, reply = await run(lambda: finish(client))
    assert code == 250, reply
    assert b"queued as" in reply


async def test_supervisor_restarts_a_crashed_service() -> None:
    """A service that raises is restarted (with backoff) instead of taking others down."""
    runs = []

    async def flaky() -> None:
        runs.append(trio.current_time())
        if len(runs) < 3:
            raise RuntimeError("boom")
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "flaky", flaky)
            while len(runs) < 3:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert runs[2] - runs[1] >= runs[1] - runs[0] >= 0.9  # 1 s, then 2 s
