"""Logging outputs: stdout JSON lines (readable on a terminal), rotated files, CloudWatch
Logs (against moto in server mode), several at once, the LOG_* environment names, and
secrets masked in every output.

Each test configures the process-wide loguru logger through smtpproxy.observe.logsetup and
leaves it as loguru starts (one stderr sink) afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.fernet import Fernet
from loguru import logger

from smtpproxy.config import Config, load_config, structure
from smtpproxy.errors import ConfigError
from smtpproxy.observe import logsetup
from smtpproxy.observe.cloudwatch import (
    EVENT_OVERHEAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    MAX_SPAN_MS,
    CloudWatchSink,
    CloudWatchStats,
    make_client,
)
from tests.support.cwlogs import CallLog, MotoLogs, dummy_aws_environment
from tests.support.net import closed_port_url
from tests.support.process import SmtpProxyProcess, write_config

SECRETS = {"password": "hunter2-pw", "api_key": "SG.live-key-123", "secret": "s3cr3t-value"}
BODY = b"Subject: hi\r\n\r\nconfidential body"
IDS = {"message_id": "msg-0001", "tenant_id": 7, "account_id": 42}


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def config(tmp_path: Path, **log: Any) -> Config:
    return structure({"data_dir": str(tmp_path / "data"), "log": log}, "tests")


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cw_stats() -> CloudWatchStats:
    stats = logsetup.cloudwatch_statistics()
    assert stats is not None, "the cloudwatch output is not configured"
    return stats


def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logsetup.shutdown()
    logger.add(sys.stderr)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and region: nothing can reach or bill a real account."""
    for name, value in dummy_aws_environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture(scope="module")
def moto_logs() -> Iterator[MotoLogs]:
    with MotoLogs() as server:
        yield server


# -- stdout ----------------------------------------------------------------------------


def test_stdout_is_json_lines_with_bound_ids(tmp_path: Path) -> None:
    """Not on a terminal, stdout gets one JSON object per record, with the bound ids."""
    out = io.StringIO()
    logsetup.configure(config(tmp_path, output=["stdout"], level="DEBUG"), stream=out)
    log = logger.bind(**IDS)
    log.debug("accepted from {}", "10.0.0.1")
    log.bind(provider="sendgrid").info("delivered")
    logging.getLogger("botocore.test").warning("from the standard library")
    try:
        _fail("provider down")
    except RuntimeError:
        log.exception("delivery failed")
    lines = json_lines(out.getvalue())
    assert [r["msg"] for r in lines] == [
        "accepted from 10.0.0.1",
        "delivered",
        "from the standard library",
        "delivery failed",
    ]
    for record in (lines[0], lines[1], lines[3]):
        assert {k: record[k] for k in IDS} == IDS
    assert lines[0]["level"] == "DEBUG"
    assert lines[1]["provider"] == "sendgrid"
    assert lines[2]["source"] == "botocore.test"
    assert lines[3]["error"] == "RuntimeError: provider down"
    assert "Traceback" in lines[3]["traceback"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d", r["ts"]) for r in lines)


def _fail(reason: str) -> None:
    raise RuntimeError(reason)


def test_stdout_level_filters_records(tmp_path: Path) -> None:
    """log.level drops records below it."""
    out = io.StringIO()
    logsetup.configure(config(tmp_path, output=["stdout"], level="WARNING"), stream=out)
    logger.info("quiet")
    logger.warning("loud")
    assert [r["msg"] for r in json_lines(out.getvalue())] == ["loud"]


def test_terminal_gets_readable_lines(tmp_path: Path) -> None:
    """On a terminal stdout gets readable lines (time, level, message, extras), not JSON."""
    term = Terminal()
    logsetup.configure(config(tmp_path, output=["stdout"]), stream=term)
    logger.bind(**IDS).info("delivered")
    text = re.sub(r"\x1b\[[0-9;]*m", "", term.getvalue())
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} INFO +delivered ", text)
    assert "message_id=msg-0001 tenant_id=7 account_id=42" in text
    with pytest.raises(ValueError):
        json.loads(text)


# -- file ------------------------------------------------------------------------------


def test_file_output_rotates_and_keeps_max_files(tmp_path: Path) -> None:
    """The file rotates at max_size_mb and max_files files are kept in all, each holding
    whole JSON lines, the newest records in the current file."""
    path = tmp_path / "logs" / "smtpproxy.log"
    cfg = config(tmp_path, output=["file"], file_path=str(path), max_size_mb=1, max_files=3)
    logsetup.configure(cfg)
    filler = "x" * 1000
    total = 5600  # about 5.6 MB: five rotations of 1 MiB
    for i in range(total):
        logger.bind(seq=i).info(filler)
    logsetup.shutdown()
    files = sorted(path.parent.glob("smtpproxy*.log"), key=lambda p: (p == path, p.name))
    assert len(files) == 3
    assert files[-1] == path
    seqs: list[int] = []
    for f in files:
        assert f.stat().st_size <= 1024 * 1024
        seqs += [r["seq"] for r in json_lines(f.read_text())]
    assert seqs == list(range(seqs[0], total))  # the newest, contiguous, oldest gone
    assert seqs[0] > 0
    assert len(seqs) > 2 * 1024 * 1024 // 1100


def test_file_output_default_path_is_in_data_dir(tmp_path: Path) -> None:
    """Without log.file_path the file is <data_dir>/smtpproxy.log, created with its dir."""
    cfg = config(tmp_path, output=["file"])
    logsetup.configure(cfg)
    logger.bind(**IDS).info("hello")
    logsetup.shutdown()
    [record] = json_lines((tmp_path / "data" / "smtpproxy.log").read_text())
    assert record["msg"] == "hello"
    assert record["message_id"] == "msg-0001"


# -- CloudWatch ------------------------------------------------------------------------


def test_cloudwatch_output_is_accepted_by_config(tmp_path: Path) -> None:
    """'cloudwatch' is a valid log.output together with the others."""
    cfg = config(tmp_path, output=["stdout", "file", "cloudwatch"])
    assert cfg.log.output == ("stdout", "file", "cloudwatch")
    assert cfg.log.cw_buffer_events == 50000


def test_cloudwatch_without_a_region_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: None
) -> None:
    """With no cw_region and none in the AWS environment, configure() names the key."""
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(ConfigError, match=r"log\.cw_region"):
        logsetup.configure(config(tmp_path, output=["cloudwatch"]))


def test_cloudwatch_with_a_malformed_endpoint_is_a_config_error(
    tmp_path: Path, aws_env: None
) -> None:
    """A cw_endpoint that is not a URL is reported against log.cw_endpoint."""
    with pytest.raises(ConfigError, match=r"log\.cw_endpoint: Invalid endpoint"):
        logsetup.configure(config(tmp_path, output=["cloudwatch"], cw_endpoint="not a url"))


def test_cloudwatch_creates_group_and_stream_and_delivers_in_order(
    tmp_path: Path, moto_logs: MotoLogs, aws_env: None
) -> None:
    """Group and stream are created on first use; events arrive in order as JSON lines
    with the bound ids, and shutdown sends what is buffered."""
    group = moto_logs.new_group_name()
    cfg = config(tmp_path, output=["cloudwatch"], **moto_logs.log_settings(group, "host-1"))
    logsetup.configure(cfg)
    assert group not in moto_logs.groups()
    for i in range(50):
        logger.bind(**IDS, seq=i).info("record {}", i)
    logsetup.shutdown()
    assert group in moto_logs.groups()
    assert moto_logs.streams(group) == ["host-1"]
    events = moto_logs.events(group, "host-1")
    records = [json.loads(e["message"]) for e in events]
    assert [r["seq"] for r in records] == list(range(50))
    assert all({k: r[k] for k in IDS} == IDS for r in records)
    assert records[3]["msg"] == "record 3"
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    assert abs(stamps[0] / 1000 - time.time()) < 60


def test_cloudwatch_sends_on_its_own_every_second(
    tmp_path: Path, moto_logs: MotoLogs, aws_env: None
) -> None:
    """Without a shutdown, buffered records reach CloudWatch within about a second, and
    the statistics count them."""
    group = moto_logs.new_group_name()
    logsetup.configure(config(tmp_path, output=["cloudwatch"], **moto_logs.log_settings(group)))
    logger.bind(**IDS).info("soon")
    wait_for(lambda: cw_stats().sent == 1, timeout=5)
    assert [json.loads(m)["msg"] for m in moto_logs.messages(group, "test-stream")] == ["soon"]
    stats = cw_stats()
    assert (stats.batches, stats.dropped, stats.buffered) == (1, 0, 0)


def test_cloudwatch_batches_many_records_into_few_calls(
    tmp_path: Path, moto_logs: MotoLogs, aws_env: None
) -> None:
    """25,000 records go out in a handful of PutLogEvents calls, each within
    CloudWatch's limits (10,000 events, 1,048,576 bytes with 26 per event, in order)."""
    group = moto_logs.new_group_name()
    moto_logs.create(group, "test-stream")  # so that every call counted is a send
    cfg = config(
        tmp_path,
        output=["cloudwatch"],
        cw_buffer_events=100_000,
        **moto_logs.log_settings(group),
    )
    logsetup.configure(cfg)
    sink = logsetup.cloudwatch_sink()
    assert sink is not None
    calls = CallLog(sink.client, "PutLogEvents")
    total = 25_000
    for i in range(total):
        logger.bind(seq=i).info("small record")
    logsetup.shutdown()
    cw_stats_at_stop = sink.statistics()
    assert 3 <= len(calls) <= 8
    sent = 0
    for call in calls.calls:
        events = call["logEvents"]
        assert len(events) <= MAX_BATCH_EVENTS
        assert sum(len(e["message"].encode()) + EVENT_OVERHEAD for e in events) <= MAX_BATCH_BYTES
        stamps = [e["timestamp"] for e in events]
        assert stamps == sorted(stamps)
        sent += len(events)
    assert sent == total
    assert (cw_stats_at_stop.sent, cw_stats_at_stop.batches) == (total, len(calls))
    seqs = [json.loads(m)["seq"] for m in moto_logs.messages(group, "test-stream")]
    assert sorted(seqs) == list(range(total))


def test_cloudwatch_batches_respect_the_byte_limit(
    tmp_path: Path, moto_logs: MotoLogs, aws_env: None
) -> None:
    """Large records are split by size: no call carries more than 1,048,576 bytes."""
    group = moto_logs.new_group_name()
    moto_logs.create(group, "test-stream")
    logsetup.configure(config(tmp_path, output=["cloudwatch"], **moto_logs.log_settings(group)))
    sink = logsetup.cloudwatch_sink()
    assert sink is not None
    calls = CallLog(sink.client, "PutLogEvents")
    for i in range(300):
        logger.bind(seq=i).info("y" * 10_000)  # about 3 MB in all
    logsetup.shutdown()
    sizes = [sum(len(e["message"]) + EVENT_OVERHEAD for e in c["logEvents"]) for c in calls.calls]
    assert len(sizes) >= 3
    assert max(sizes) <= MAX_BATCH_BYTES
    assert sum(len(c["logEvents"]) for c in calls.calls) == 300
    assert len(moto_logs.messages(group, "test-stream")) == 300


def test_batch_building_follows_the_putlogevents_rules(aws_env: None) -> None:
    """take_batch splits at a 24-hour span, orders each batch by time, and an oversized
    line is truncated to 256 KB (with a note saying so)."""
    sink = CloudWatchSink(make_client("us-east-1", closed_port_url()), "g", "s")  # not started
    base = 1_700_000_000_000
    hour = 3600 * 1000
    sink.append(base + 2, "b")
    sink.append(base + 1, "a")  # logged from another thread a moment earlier
    sink.append(base + 23 * hour, "c")
    sink.append(base + 25 * hour, "d")  # more than 24 h after the first
    sink.append(base + 26 * hour, "z" * (MAX_EVENT_BYTES + 5000))
    first = sink.take_batch()
    assert [e.message for e in first] == ["a", "b", "c"]
    assert first[-1].timestamp - first[0].timestamp < MAX_SPAN_MS
    second = sink.take_batch()
    assert len(second) == 2
    assert second[0].message == "d"
    big = second[1].message
    assert len(big.encode()) + EVENT_OVERHEAD <= MAX_EVENT_BYTES
    assert "truncated" in big[-60:]
    assert sink.take_batch() == []
    sink.client.close()


def test_batch_building_respects_count_and_bytes(aws_env: None) -> None:
    """A batch holds at most 10,000 events and 1,048,576 bytes (26 per event included)."""
    sink = CloudWatchSink(make_client("us-east-1", closed_port_url()), "g", "s", max_events=30_000)
    for i in range(12_000):
        sink.append(1_700_000_000_000 + i, "e")
    assert len(sink.take_batch()) == MAX_BATCH_EVENTS
    assert len(sink.take_batch()) == 2_000
    line = "w" * (100_000 - EVENT_OVERHEAD)  # exactly 100,000 bytes per event
    for i in range(25):
        sink.append(1_700_000_000_000 + i, line)
    assert len(sink.take_batch()) == 10  # 11 would be 1,100,000 bytes
    assert sink.statistics().buffered == 15
    sink.client.close()


def test_unreachable_cloudwatch_never_blocks_and_drops_with_a_count(
    tmp_path: Path, aws_env: None
) -> None:
    """With CloudWatch unreachable, 10,000 records log quickly, the buffer stays bounded
    (dropped is counted and keeps rising), failures are counted and reported on the
    other outputs, and shutdown returns within its deadline."""
    out = io.StringIO()
    cfg = config(
        tmp_path,
        output=["stdout", "cloudwatch"],
        cw_group="unreachable",
        cw_region="us-east-1",
        cw_endpoint=closed_port_url(),
        cw_buffer_events=1000,
    )
    logsetup.configure(cfg, stream=out)
    started = time.monotonic()
    for i in range(10_000):
        logger.bind(seq=i).info("while CloudWatch is down")
    assert time.monotonic() - started < 5
    stats = cw_stats()
    assert stats.buffered <= 1000
    assert stats.dropped >= 10_000 - 2 * 1000  # at most one batch is out of the buffer
    wait_for(lambda: cw_stats().failed >= 1)
    for i in range(2000):
        logger.bind(seq=i).info("still down")
    later = cw_stats()
    assert later.dropped >= stats.dropped + 1000
    assert later.sent == 0
    assert any(
        r["msg"].startswith("CloudWatch Logs unavailable") for r in json_lines(out.getvalue())
    )
    started = time.monotonic()
    logsetup.shutdown()
    assert time.monotonic() - started < 5


# -- together --------------------------------------------------------------------------


def test_several_outputs_at_once(tmp_path: Path, moto_logs: MotoLogs, aws_env: None) -> None:
    """stdout, file and cloudwatch together each get every record as the same JSON."""
    group = moto_logs.new_group_name()
    path = tmp_path / "both.log"
    out = io.StringIO()
    cfg = config(
        tmp_path,
        output=["stdout", "file", "cloudwatch"],
        file_path=str(path),
        **moto_logs.log_settings(group),
    )
    logsetup.configure(cfg, stream=out)
    for i in range(5):
        logger.bind(**IDS, seq=i).warning("record {}", i)
    logsetup.shutdown()
    from_stdout = json_lines(out.getvalue())
    from_file = json_lines(path.read_text())
    from_cloudwatch = [json.loads(m) for m in moto_logs.messages(group, "test-stream")]
    assert [r["seq"] for r in from_stdout] == list(range(5))
    assert from_stdout == from_file == from_cloudwatch


def test_log_environment_names_select_outputs_and_paths(
    tmp_path: Path, moto_logs: MotoLogs, aws_env: None
) -> None:
    """LOG_OUTPUT, LOG_FILE_PATH, LOG_MAX_SIZE_MB, LOG_MAX_FILES, LOG_CW_GROUP and
    LOG_CW_STREAM configure the outputs through load_config."""
    group = moto_logs.new_group_name()
    path = tmp_path / "env" / "relay.log"
    toml = write_config(tmp_path / "smtpproxy.toml", {"data_dir": str(tmp_path / "data")})
    environ = {
        "LOG_OUTPUT": "file,cloudwatch",
        "LOG_FILE_PATH": str(path),
        "LOG_MAX_SIZE_MB": "2",
        "LOG_MAX_FILES": "4",
        "LOG_CW_GROUP": group,
        "LOG_CW_STREAM": "from-env",
        "SMTPPROXY_LOG_CW_ENDPOINT": moto_logs.endpoint,
        "SMTPPROXY_LOG_CW_REGION": "us-east-1",
        "SMTPPROXY_LOG_CW_BUFFER_EVENTS": "500",
    }
    cfg = load_config(str(toml), environ=environ)
    assert cfg.log.output == ("file", "cloudwatch")
    assert (cfg.log.max_size_mb, cfg.log.max_files, cfg.log.cw_buffer_events) == (2, 4, 500)
    out = io.StringIO()
    logsetup.configure(cfg, stream=out)
    logger.bind(**IDS).info("configured from the environment")
    logsetup.shutdown()
    assert out.getvalue() == ""  # stdout was not selected
    [record] = json_lines(path.read_text())
    assert record["msg"] == "configured from the environment"
    [message] = moto_logs.messages(group, "from-env")
    assert json.loads(message) == record


# -- secrets -----------------------------------------------------------------------------


def test_secrets_are_masked_in_every_output(
    tmp_path: Path, moto_logs: MotoLogs, aws_env: None
) -> None:
    """password, api_key and secret extras (also nested ones), URL passwords and bodies
    never reach stdout JSON, a terminal, the file or CloudWatch."""
    group = moto_logs.new_group_name()
    path = tmp_path / "secret.log"
    json_out, term = io.StringIO(), Terminal()
    cw = moto_logs.log_settings(group)

    def emit() -> None:
        log = logger.bind(**IDS, **SECRETS)
        log.bind(
            provider={"name": "sg", "api_key": "SG.nested-key"},
            body=BODY,
            dsn="postgresql://relay:db-pass-9@db/relay",
        ).warning("connecting to redis://:redis-pass-7@cache:6379/0 with password=inline-pw")

    logsetup.configure(
        config(tmp_path, output=["stdout", "file", "cloudwatch"], file_path=str(path), **cw),
        stream=json_out,
    )
    emit()
    logsetup.configure(config(tmp_path, output=["stdout"]), stream=term)  # flushes CloudWatch
    emit()
    logsetup.shutdown()
    outputs = {
        "stdout": json_out.getvalue(),
        "terminal": term.getvalue(),
        "file": path.read_text(),
        "cloudwatch": "\n".join(moto_logs.messages(group, "test-stream")),
    }
    leaks = [*SECRETS.values(), "SG.nested-key", "confidential", "db-pass-9", "redis-pass-7"]
    leaks.append("inline-pw")
    for name, text in outputs.items():
        assert "msg-0001" in text, name
        assert "********" in text, name
        assert [s for s in leaks if s in text] == [], name
    record = json_lines(outputs["stdout"])[0]
    assert {k: record[k] for k in SECRETS} == dict.fromkeys(SECRETS, "********")
    assert record["provider"] == {"name": "sg", "api_key": "********"}
    assert record["body"] == f"<{len(BODY)} bytes omitted>"
    assert record["dsn"] == "postgresql://relay:********@db/relay"


def test_body_like_extras_and_huge_messages_are_not_logged(tmp_path: Path) -> None:
    """A str bound as body/raw/mime is replaced by its length, and a message longer
    than 16 KiB is cut."""
    out = io.StringIO()
    logsetup.configure(config(tmp_path, output=["stdout"]), stream=out)
    logger.bind(body="Dear Bob, the merger...", raw_mime="MIME-Version: 1.0").info("x")
    logger.info("dump: {}", "B" * 100_000)
    first, second = json_lines(out.getvalue())
    assert first["body"] == "<23 characters omitted>"
    assert first["raw_mime"] == "<17 characters omitted>"
    assert len(second["msg"]) < 17 * 1024
    assert second["msg"].endswith("characters cut]")


# -- a real process ------------------------------------------------------------------------


@pytest.mark.slow
async def test_run_process_logs_json_to_stdout_file_and_cloudwatch(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    key_prefix: str,
    clean: None,
    moto_logs: MotoLogs,
) -> None:
    """`smtpproxy run` with LOG_OUTPUT=stdout,file,cloudwatch writes JSON lines to its
    (non-terminal) stdout and the file, and its last records reach CloudWatch at exit."""
    group = moto_logs.new_group_name()
    path = tmp_path / "run.log"
    toml = write_config(
        tmp_path / "smtpproxy.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "smtp": {"listen": ["127.0.0.1:0"], "hostname": "relay.test"},
            "database": {"url": pg_url},
            "redis": {"url": redis_url, "key_prefix": key_prefix},
            "health": {"listen": "127.0.0.1:0"},
            "security": {"secret_key": Fernet.generate_key().decode()},
            "run": {"delivery_processes": 0},  # one process: its lines in every sink
        },
    )
    env = {
        **dummy_aws_environment(),
        "LOG_OUTPUT": "stdout,file,cloudwatch",
        "LOG_FILE_PATH": str(path),
        "LOG_CW_GROUP": group,
        "LOG_CW_STREAM": "relay-1",
        "SMTPPROXY_LOG_CW_ENDPOINT": moto_logs.endpoint,
    }
    proc = SmtpProxyProcess(toml, env=env)
    await trio.to_thread.run_sync(proc.wait_ready)
    assert await trio.to_thread.run_sync(lambda: proc.stop(signal.SIGTERM)) == 0
    stdout_msgs = proc.messages()
    assert "smtpproxy ready" in stdout_msgs
    assert "smtpproxy stopped" in stdout_msgs
    assert [r["msg"] for r in json_lines(path.read_text())] == stdout_msgs
    cloudwatch_msgs = [json.loads(m)["msg"] for m in moto_logs.messages(group, "relay-1")]
    assert cloudwatch_msgs == stdout_msgs
