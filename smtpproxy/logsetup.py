"""Logging with loguru: JSON lines for machines, readable lines on a terminal.

Every record carries what was bound to it (message_id, tenant_id, account_id, ...).
Nothing logged may contain a message body, a password or a provider secret: callers
bind ids and names only. Records from the standard logging module (aiosmtpd, psycopg
pool, botocore) are routed here too.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

from loguru import logger

from smtpproxy.config import Config


def _json_line(record: Any) -> str:
    out: dict[str, Any] = {
        "ts": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "msg": record["message"],
    }
    for key, value in record["extra"].items():
        if key.startswith("_"):
            continue
        out[key] = (
            value if isinstance(value, str | int | float | bool | None | list) else str(value)
        )
    if record["exception"] is not None:
        exc = record["exception"]
        out["error"] = f"{exc.type.__name__}: {exc.value}" if exc.type else ""
    return json.dumps(out, ensure_ascii=False)


def json_sink(stream: TextIO) -> Callable[[Any], None]:
    def write(message: Any) -> None:
        stream.write(_json_line(message.record) + "\n")
        stream.flush()

    return write


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
    out = stream or sys.stderr
    logger.remove()
    level = cfg.log.level
    if "stdout" in cfg.log.output:
        target = stream or sys.stdout
        if target.isatty():
            logger.add(
                target,
                level=level,
                format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message} "
                "<dim>{extra}</dim>",
                colorize=True,
            )
        else:
            logger.add(json_sink(target), level=level, format="{message}")
    if "file" in cfg.log.output:
        path = cfg.log_file_path
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.add(
            str(path),
            level=level,
            format=_file_format,
            rotation=cfg.log.max_size_mb * 1024 * 1024,
            retention=cfg.log.max_files,
        )
    if not cfg.log.output:
        logger.add(out, level="WARNING")
    logging.basicConfig(handlers=[_Intercept()], level=logging.WARNING, force=True)


def _file_format(record: Any) -> str:
    # a callable format: loguru then appends no multi-line traceback to the JSON line
    record["extra"]["_json"] = _json_line(record)
    return "{extra[_json]}\n"


def configure_cli() -> None:
    """CLI commands log only warnings, readably, to stderr."""
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}")
    logging.basicConfig(handlers=[_Intercept()], level=logging.WARNING, force=True)
