"""Logging with loguru: JSON lines for machines, readable lines on a terminal.

Outputs (``log.output``, several at once): ``stdout`` (JSON lines; readable lines when
stdout is a terminal), ``file`` (JSON lines at ``log.file_path``, rotated at
``log.max_size_mb``, ``log.max_files`` files kept in all) and ``cloudwatch`` (batched
PutLogEvents from a background thread, see smtpproxy.observe.cloudwatch).

Every record carries what was bound to it (message_id, tenant_id, account_id, ...).
Nothing logged may contain a message body, a password or a provider secret: callers
bind ids and names only. As a last line of defence every output masks the value of an
extra whose key looks secret (password, api_key, secret, token, ...), omits extras whose
key names a body (body, raw, mime, payload, content) and any bytes value, hides the
password of ``scheme://user:password@host`` URLs and ``password=...`` in text, and
cuts very long messages. Records from the standard logging module (aiosmtpd, psycopg
pool, botocore) are routed here too.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import traceback
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TextIO

import attrs
from loguru import logger

from smtpproxy.errors import ConfigError

if TYPE_CHECKING:
    from smtpproxy.config import Config
    from smtpproxy.observe.cloudwatch import CloudWatchSink, CloudWatchStats

MASK = "********"
MAX_MESSAGE_CHARS = 16 * 1024  # longer messages are cut: a body never fits in a log line
_MAX_DEPTH = 4

_SECRET_KEY = re.compile(
    r"password|passwd|passphrase|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|auth[_-]?key|credential|authorization|cookie|signature",
    re.IGNORECASE,
)
_BODY_KEY = re.compile(r"(?:^|_)(?:body|raw|mime|payload|content)$", re.IGNORECASE)
_TEXT_SECRETS = re.compile(
    r"(?P<url>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)"
    r"|(?P<kv>\b(?:password|passwd|pwd|secret|api_?key|token)\s*[=:]\s*)('(?:[^'\\]|\\.)*'|[^\s,;&'\"]+)"
    r"|(?P<bearer>\bbearer\s+)[A-Za-z0-9._~+/=-]+",
    re.IGNORECASE,
)

_cloudwatch: CloudWatchSink | None = None


# -- the last line of defence ------------------------------------------------------------


@lru_cache(maxsize=1024)
def looks_secret(key: str) -> bool:
    return _SECRET_KEY.search(key) is not None


@lru_cache(maxsize=1024)
def _looks_like_body(key: str) -> bool:
    return _BODY_KEY.search(key) is not None


def _mask_text_match(m: re.Match[str]) -> str:
    prefix = m.group("url") or m.group("kv") or m.group("bearer")
    return prefix + MASK


def scrub_text(text: str) -> str:
    """Hide URL passwords, ``password=...`` pairs and bearer tokens in free text."""
    if "://" not in text and "=" not in text and ":" not in text and "earer" not in text:
        return text
    return _TEXT_SECRETS.sub(_mask_text_match, text)


def clean_value(key: str, value: Any, depth: int = 0) -> Any:
    """A JSON-ready copy of value with secrets masked and bodies left out."""
    if value is None or (isinstance(value, bool | int | float) and not looks_secret(key)):
        return value
    if looks_secret(key):
        return MASK
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes omitted>"
    if _looks_like_body(key):
        return f"<{len(value)} characters omitted>" if isinstance(value, str) else "<omitted>"
    if isinstance(value, str) or depth >= _MAX_DEPTH:
        return scrub_text(str(value))
    return _clean_container(value, depth)


def _clean_container(value: Any, depth: int) -> Any:
    if isinstance(value, Mapping):
        return {str(k): clean_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [clean_value("", v, depth + 1) for v in value]
    if attrs.has(type(value)):
        fields = {f.name: getattr(value, f.name, None) for f in attrs.fields(type(value))}
        return {k: clean_value(k, v, depth + 1) for k, v in fields.items()}
    return scrub_text(str(value))


def clean_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The record's bound extras, without internal (``_``) keys, cleaned."""
    return {k: clean_value(k, v) for k, v in extra.items() if not k.startswith("_")}


def _clean_message(text: str) -> str:
    if len(text) > MAX_MESSAGE_CHARS:
        cut = len(text) - MAX_MESSAGE_CHARS
        text = f"{text[:MAX_MESSAGE_CHARS]} ...[{cut} characters cut]"
    return scrub_text(text)


# -- JSON lines --------------------------------------------------------------------------


def _build_json(record: Any) -> str:
    out: dict[str, Any] = {
        "ts": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "msg": _clean_message(record["message"]),
    }
    for key, value in clean_extra(record["extra"]).items():
        if key not in out:
            out[key] = value
    exc = record["exception"]
    if exc is not None:
        out["error"] = scrub_text(f"{exc.type.__name__}: {exc.value}") if exc.type else ""
        if exc.traceback is not None:
            lines = traceback.format_exception(exc.type, exc.value, exc.traceback)
            out["traceback"] = _clean_message("".join(lines))
    return json.dumps(out, ensure_ascii=False, default=str)


def _json_line(record: Any) -> str:
    """The record as one JSON object (no newline), built once per record for every sink."""
    extra = record["extra"]
    line = extra.get("_json")
    if not isinstance(line, str):
        line = _build_json(record)
        extra["_json"] = line
    return line


def json_sink(stream: TextIO) -> Callable[[Any], None]:
    def write(message: Any) -> None:
        stream.write(_json_line(message.record) + "\n")
        stream.flush()

    return write


def _file_format(record: Any) -> str:
    # a callable format: loguru then appends no multi-line traceback to the JSON line
    _json_line(record)
    return "{extra[_json]}\n"


def _text_format(record: Any) -> str:
    record["extra"]["_text"] = _clean_message(record["message"])
    return "{level}: {extra[_text]}\n"


def _tty_format(record: Any) -> str:
    extra = record["extra"]
    extra["_text"] = _clean_message(record["message"])
    shown = clean_extra(extra)
    extra["_shown"] = " ".join(f"{k}={v}" for k, v in shown.items())
    return (
        "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {extra[_text]} "
        "<dim>{extra[_shown]}</dim>\n{exception}"
    )


# -- CloudWatch --------------------------------------------------------------------------


class _CloudWatchWriter:
    """The loguru side of a CloudWatchSink: loguru calls write() per record (under its
    own lock) and stop() when the handler is removed, including at exit."""

    def __init__(self, sink: CloudWatchSink) -> None:
        self.sink = sink

    def write(self, message: Any) -> None:
        record = message.record
        self.sink.append(int(record["time"].timestamp() * 1000), _json_line(record))

    def stop(self) -> None:
        self.sink.stop()


def _cloudwatch_sink(cfg: Config) -> CloudWatchSink:
    # boto3 is imported only when this output is used: it costs every CLI command ~0.5 s
    import botocore.exceptions

    from smtpproxy.observe.cloudwatch import CloudWatchSink, make_client

    log = cfg.log
    if log.cw_buffer_events < 1:
        raise ConfigError("log.cw_buffer_events: expected a positive integer")
    if not log.cw_group:
        raise ConfigError("log.cw_group: required when log.output includes 'cloudwatch'")
    try:
        client = make_client(log.cw_region, log.cw_endpoint)
    except botocore.exceptions.NoRegionError:
        raise ConfigError(
            "log.cw_region: required for the cloudwatch output (or set AWS_REGION)"
        ) from None
    except ValueError as exc:  # botocore: "Invalid endpoint: ..."
        raise ConfigError(f"log.cw_endpoint: {exc}") from None
    stream = log.cw_stream or socket.gethostname()
    return CloudWatchSink(client, log.cw_group, stream, max_events=log.cw_buffer_events)


def cloudwatch_sink() -> CloudWatchSink | None:
    """The running CloudWatch sink, if the cloudwatch output is configured."""
    return _cloudwatch


def cloudwatch_statistics() -> CloudWatchStats | None:
    """sent/dropped/failed/rejected counters of the CloudWatch output (None: not used)."""
    return None if _cloudwatch is None else _cloudwatch.statistics()


# -- setup -------------------------------------------------------------------------------


class _Intercept(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).bind(source=record.name).log(
            level, record.getMessage()
        )


def configure(cfg: Config, *, stream: TextIO | None = None) -> None:
    """Replace every sink with the outputs cfg.log names. stream stands in for stdout
    (and stderr when no output is configured)."""
    global _cloudwatch  # noqa: PLW0603 - one logging setup per process
    logger.remove()  # also stops (and flushes) a previous CloudWatch sink
    _cloudwatch = None
    level = cfg.log.level
    if "stdout" in cfg.log.output:
        target = stream or sys.stdout
        if target.isatty():
            logger.add(
                target,
                level=level,
                format=_tty_format,
                colorize=True,
                backtrace=False,
                diagnose=False,  # variable values in tracebacks could show secrets
            )
        else:
            logger.add(json_sink(target), level=level, format="{message}")
    if "file" in cfg.log.output:
        path = cfg.log_file_path
        path.parent.mkdir(parents=True, exist_ok=True)
        max_bytes = cfg.log.max_size_mb * 1024 * 1024
        logger.add(
            str(path),
            level=level,
            format=_file_format,
            rotation=max_bytes if max_bytes > 0 else None,
            # loguru keeps this many rotated files besides the current one
            retention=cfg.log.max_files - 1 if cfg.log.max_files > 0 else None,
            encoding="utf-8",
            backtrace=False,
            diagnose=False,
        )
    if "cloudwatch" in cfg.log.output:
        sink = _cloudwatch_sink(cfg)
        sink.start()
        _cloudwatch = sink
        logger.add(_CloudWatchWriter(sink), level=level, format="{message}", colorize=False)
    if not cfg.log.output:
        logger.add(
            stream or sys.stderr,
            level="WARNING",
            format=_tty_format,
            colorize=False,
            diagnose=False,
        )
    logging.basicConfig(handlers=[_Intercept()], level=logging.WARNING, force=True)


def shutdown() -> None:
    """Remove every sink; the CloudWatch output first sends what it holds (within a few
    seconds). loguru does this at interpreter exit too."""
    global _cloudwatch  # noqa: PLW0603
    logger.remove()
    _cloudwatch = None


def configure_cli() -> None:
    """CLI commands log only warnings, readably, to stderr."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format=_text_format, diagnose=False)
    logging.basicConfig(handlers=[_Intercept()], level=logging.WARNING, force=True)
