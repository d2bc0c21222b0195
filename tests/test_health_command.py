"""`smtpproxy health` against a real `smtpproxy run` process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import trio

from smtpproxy.cli.health import endpoint_url
from smtpproxy.errors import UsageError
from tests.support.cli import as_json, fails, ok, run_cli
from tests.support.process import SmtpProxyProcess, write_config

pytestmark = pytest.mark.slow
run = trio.to_thread.run_sync


def test_endpoint_url_reaches_wildcard_listeners_over_loopback() -> None:
    assert endpoint_url("127.0.0.1:8025") == "http://127.0.0.1:8025"
    assert endpoint_url("0.0.0.0:8025") == "http://127.0.0.1:8025"
    assert endpoint_url("[::]:9000") == "http://[::1]:9000"
    assert endpoint_url("[2001:db8::5]:9000") == "http://[2001:db8::5]:9000"
    with pytest.raises(UsageError, match=r"health\.listen"):
        endpoint_url("")


@pytest.fixture
def config(tmp_path: Path, pg_url: str, redis_url: str, key_prefix: str, clean: None) -> Path:
    return write_config(
        tmp_path / "smtpproxy.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "smtp": {"listen": ["127.0.0.1:0"]},
            "database": {"url": pg_url},
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "storage": {"type": "local", "path": str(tmp_path / "store")},
            "health": {"listen": "127.0.0.1:0"},
        },
    )


async def test_health_reports_ready_then_names_the_failing_component(
    config: Path, tmp_path: Path
) -> None:
    proc = SmtpProxyProcess(config)
    try:
        with trio.fail_after(60):
            await run(proc.wait_ready)
            url = f"http://127.0.0.1:{proc.health_port}"
            out = ok(await run(lambda: run_cli(config, "health", "--url", url)))
            assert out.splitlines()[0] == "ready"
            assert "  postgresql: ok" in out.splitlines()
            body = as_json(await run(lambda: run_cli(config, "health", "--url", url, "--json")))
            assert body["status"] == "ready" and body["http_status"] == 200
            assert body["checks"]["redis"] == "ok"
            live = as_json(
                await run(lambda: run_cli(config, "health", "--url", url, "--live", "--json"))
            )
            assert live["status"] == "alive"

            shutil.rmtree(tmp_path / "store")
            await trio.sleep(1.2)  # past the endpoint's one-second cache
            bad = await run(lambda: run_cli(config, "health", "--url", url))
            assert bad.returncode == 1
            assert bad.stdout.splitlines()[0] == "not ready: store"
            assert "Traceback" not in bad.stdout + bad.stderr
            still_alive = await run(lambda: run_cli(config, "health", "--url", url, "--live"))
            assert ok(still_alive).startswith("alive")
    finally:
        await run(proc.stop)

    with trio.fail_after(30):
        gone = await run(lambda: run_cli(config, "health", "--url", url))
    fails(gone, "no answer")
