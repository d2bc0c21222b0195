"""Configuration: one TOML file, loaded strictly into frozen attrs classes.

Owns the shape of every setting, its default, the file lookup order, environment
overrides, and error messages that name the key path (``smtp.listen[0]: expected
host:port``). It must not open sockets, files other than the config file, or start
anything: callers turn a Config into resources.

The package also holds the secrets an operator configures, as they are kept at rest:
provider secrets encrypted with the configured key (crypto.py) and account passwords
as scrypt hashes (passwords.py).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

from smtpproxy.errors import ConfigError

EMBEDDED = "embedded"
CONFIG_ENV = "SMTPPROXY_CONFIG"
MAX_PROCESSES = 64
DEFAULT_PATHS = (Path("smtpproxy.toml"), Path("/etc/smtpproxy/smtpproxy.toml"))


def secret(default: str = "") -> Any:
    """An attrs field whose value is masked whenever the config is shown."""
    return attrs.field(default=default, metadata={"secret": True})


# -- value types -----------------------------------------------------------------------


@attrs.frozen(order=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]*):(\d{1,5})", text.strip())
        if m is None:
            raise ConfigValueError("expected host:port")
        host = m.group(1) if m.group(1) is not None else m.group(3)
        port = int(m.group(2) or m.group(4))
        if port > 65535:
            raise ConfigValueError("expected host:port with a port from 0 to 65535")
        return cls(host or "0.0.0.0", port)  # noqa: S104 - ":25" means all interfaces

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> float:
    """'30s', '5m', '1h', '2d', '250ms', or a number of seconds."""
    if isinstance(value, bool):
        raise ConfigValueError("expected a duration like '30s', '5m' or '2d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if m is None:
            raise ConfigValueError("expected a duration like '30s', '5m' or '2d'")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    else:
        raise ConfigValueError("expected a duration like '30s', '5m' or '2d'")
    if seconds < 0:
        raise ConfigValueError("expected a duration that is not negative")
    return seconds


_SIZES = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3}


def parse_size(value: object) -> int:
    """A byte count: 10485760, '10MiB', '25MB'."""
    if isinstance(value, bool):
        raise ConfigValueError("expected a size in bytes like 10485760 or '10MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if m is None or m.group(2).lower() not in _SIZES:
            raise ConfigValueError("expected a size in bytes like 10485760 or '10MiB'")
        size = int(m.group(1)) * _SIZES[m.group(2).lower()]
    else:
        raise ConfigValueError("expected a size in bytes like 10485760 or '10MiB'")
    if size < 0:
        raise ConfigValueError("expected a size that is not negative")
    return size


class ConfigValueError(ValueError):
    """A value has the wrong shape; the message says what was expected."""


class Duration(float):
    """Seconds, written in the file as '30s', '5m', '2d'."""


class Size(int):
    """Bytes, written in the file as 10485760 or '10MiB'."""


# -- sections --------------------------------------------------------------------------


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "smtpproxy")


@attrs.frozen
class SmtpConfig:
    listen: tuple[HostPort, ...] = (HostPort("127.0.0.1", 2525),)
    tls_listen: tuple[HostPort, ...] = ()  # implicit TLS (port 465 style)
    # listeners for devices that can do neither AUTH nor modern TLS (none by default):
    # registered device networks send without AUTH there, and TLS goes down to
    # device_tls_min; the listeners above never allow either
    device_listen: tuple[HostPort, ...] = ()
    device_tls_min: Literal["1.0", "1.1", "1.2"] = "1.0"
    hostname: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    max_message_size: Size = Size(25 * 1024 * 1024)
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 100
    allow_plaintext_auth: bool = False
    # SO_REUSEPORT on the listeners: several `smtpproxy run` processes on one host share
    # the same ports and the kernel spreads new connections between them
    reuse_port: bool = False
    timeout: Duration = Duration(300)  # idle: no command or data for this long
    # DATA may take timeout plus one second per min_data_rate bytes received (0: no limit)
    min_data_rate: int = 500
    # longest line of message data (RFC 5322: 998); longer lines are refused with 554
    max_line_length: int = 998
    max_session_duration: Duration = Duration(1800)  # a whole session, however busy
    check_header_from: bool = False  # header From must also be in the allowed domains
    max_queue_depth: int = 0  # backlog above which new transactions get 421 (0: off)
    auth_cache_ttl: Duration = Duration(300)  # a verified login is remembered this long
    auth_max_failures: int = 5  # per client IP or username within auth_failure_window
    auth_failure_window: Duration = Duration(900)
    commit_batch_max: int = 256
    committers: int = 2
    # a message is answered within this long of its final dot: past it, 451, and
    # nothing of it is kept (a store, database or Redis that hangs costs no more)
    commit_timeout: Duration = Duration(20)
    enqueue_retry_delays: tuple[Duration, ...] = (Duration(0.5), Duration(1), Duration(2))
    # a resubmission (same account, Message-ID, body, sender and recipient set) within
    # this window gets the original's 250 instead of being delivered twice; "0": off
    duplicate_window: Duration = Duration(600)

    def effective_hostname(self) -> str:
        return self.hostname or socket.gethostname()


@attrs.frozen
class DatabaseConfig:
    url: str = secret(EMBEDDED)
    pool_min: int = 2
    pool_max: int = 10
    connect_timeout: Duration = Duration(5)
    retention_days: int = 365  # finished messages and delivery logs; 0 keeps them forever


@attrs.frozen
class RedisConfig:
    url: str = secret(EMBEDDED)
    key_prefix: str = "smtpproxy"
    socket_timeout: Duration = Duration(5)
    # the account legacy stream entries (the original single-stream format) are sent as,
    # when an entry names none
    legacy_account: str = ""


@attrs.frozen
class StorageConfig:
    type: Literal["local", "s3"] = "local"
    path: str = ""  # default: <data_dir>/messages
    sync: Literal["syncfs", "fsync"] = "syncfs"
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = secret()
    retention_days: int = 30  # bodies of finished messages; 0 keeps them forever
    check_interval: Duration = Duration(3600)  # the consistency checker in `run`; 0: off
    orphan_grace: Duration = Duration(3600)  # a body younger than this is never an orphan
    orphan_action: Literal["quarantine", "delete", "report"] = "quarantine"


@attrs.frozen
class DeliveryConfig:
    enabled: bool = True  # false: an ingress-only instance (others deliver)
    # messages in flight per consumer: cheap trio tasks; each provider gets at most its
    # own max_connections of them. At a 200 ms API round trip, 1,024 carry 5,000 msgs/s.
    concurrency: int = 1024
    max_attempts: int = 10
    max_age: Duration = Duration(2 * 86400)
    retry_schedule: tuple[Duration, ...] = tuple(Duration(s) for s in (30, 60, 120, 300, 900, 1800))
    default_route: str = ""
    visibility_timeout: Duration = Duration(300)
    # every consumer beats in Redis this often; one silent for heartbeat_lifetime is dead,
    # and what it held (stream entries, messages in `sending`) is taken over at once
    heartbeat_interval: Duration = Duration(2)
    heartbeat_lifetime: Duration = Duration(10)
    scheduler_interval: Duration = Duration(1)
    body_read_retries: tuple[Duration, ...] = (Duration(1), Duration(2), Duration(4))
    shutdown_grace: Duration = Duration(25)
    breaker_threshold: int = 5  # consecutive transient failures that open a provider's circuit
    breaker_cooldown: Duration = Duration(30)  # then one probe is let through
    provider_wait: Duration = Duration(10)  # longest wait for a saturated provider's slot
    reconcile_interval: Duration = Duration(30)  # how often lost stream entries are looked for
    reconcile_grace: Duration = Duration(60)  # a queued row older than this should be consumed


@attrs.frozen
class HealthConfig:
    listen: str = "127.0.0.1:8025"  # "" disables the endpoint


@attrs.frozen
class LogConfig:
    output: tuple[Literal["stdout", "file", "cloudwatch"], ...] = ("stdout",)
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file_path: str = ""  # default: <data_dir>/smtpproxy.log
    max_size_mb: int = 100
    max_files: int = 10
    cw_group: str = "smtpproxy"
    cw_stream: str = ""  # default: the host name
    cw_region: str = ""
    cw_endpoint: str = ""
    cw_buffer_events: int = 50000  # held in memory while CloudWatch is slow; then oldest dropped


@attrs.frozen
class SecurityConfig:
    secret_key: str = secret()  # base64 Fernet key; when empty, secret_key_file is used
    secret_key_file: str = ""  # default: <data_dir>/secret.key, created 0600 on first use


def default_delivery_processes(cpus: int | None = None) -> int:
    """run.delivery_processes when the config does not say: one delivery process
    beside the SMTP process where there is a second core for it."""
    return 1 if (cpus if cpus is not None else os.cpu_count() or 1) >= 2 else 0


@attrs.frozen
class RunConfig:
    # processes `smtpproxy run` serves SMTP with (each uses a core): the first starts the
    # others; they share the SMTP ports (SO_REUSEPORT) (workers.py)
    processes: int = 1
    # processes that only deliver, started by the first one too; with 0 every SMTP
    # process delivers as well. Default: 1 on a machine with two or more cores (ingest
    # and delivery then each have an interpreter of their own), else 0
    delivery_processes: int = attrs.field(factory=default_delivery_processes)


@attrs.frozen
class Config:
    data_dir: str = attrs.field(factory=_default_data_dir)
    run: RunConfig = RunConfig()
    smtp: SmtpConfig = SmtpConfig()
    database: DatabaseConfig = DatabaseConfig()
    redis: RedisConfig = RedisConfig()
    storage: StorageConfig = StorageConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    health: HealthConfig = HealthConfig()
    log: LogConfig = LogConfig()
    security: SecurityConfig = SecurityConfig()
    # providers usable by every tenant, by name; tenants' own providers shadow them
    providers: dict[str, dict[str, Any]] = attrs.Factory(dict)
    # where this config came from ("" = built-in newcomer defaults)
    source: str = attrs.field(default="", metadata={"internal": True})

    # derived paths --------------------------------------------------------------
    def path_in_data_dir(self, value: str, default_name: str) -> Path:
        return Path(value) if value else Path(self.data_dir) / default_name

    @property
    def storage_path(self) -> Path:
        return self.path_in_data_dir(self.storage.path, "messages")

    @property
    def secret_key_file(self) -> Path:
        return self.path_in_data_dir(self.security.secret_key_file, "secret.key")

    @property
    def log_file_path(self) -> Path:
        return self.path_in_data_dir(self.log.file_path, "smtpproxy.log")

    @property
    def uses_embedded(self) -> bool:
        return EMBEDDED in (self.database.url, self.redis.url)


def newcomer_defaults(data_dir: str | None = None) -> dict[str, Any]:
    """Raw config used when no config file exists: embedded servers, SMTP on
    127.0.0.1:2525, and mail delivered into <data_dir>/outbox by the file provider."""
    base = data_dir or _default_data_dir()
    return {
        "data_dir": base,
        "delivery": {"default_route": "outbox"},
        "providers": {"outbox": {"type": "file", "path": str(Path(base) / "outbox")}},
    }


# -- structuring -----------------------------------------------------------------------


def _strict(kind: type, expected: str) -> Callable[[object, type], object]:
    def hook(value: object, _: type) -> object:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigValueError(f"expected {expected}")
        return value

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(float, _strict(float, "a number"))

    def host_port(value: object, _: type) -> HostPort:
        if not isinstance(value, str):
            raise ConfigValueError("expected host:port")
        return HostPort.parse(value)

    conv.register_structure_hook(HostPort, host_port)
    conv.register_structure_hook(Duration, lambda v, _: Duration(parse_duration(v)))
    conv.register_structure_hook(Size, lambda v, _: Size(parse_size(v)))

    def literal(value: object, tp: Any) -> object:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigValueError("expected one of " + ", ".join(repr(a) for a in allowed))
        return value

    def is_literal(tp: Any) -> bool:
        return get_origin(tp) is Literal

    conv.register_structure_hook_func(is_literal, literal)

    def any_table(value: object, _: type) -> object:
        return value

    # a string is iterable: without this, "35" for a list of durations becomes (3, 5)
    def is_homogeneous_tuple(tp: Any) -> bool:
        args = get_args(tp)
        return get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis

    def strict_tuple(value: object, tp: Any) -> object:
        if not isinstance(value, list | tuple):
            raise ConfigValueError("expected a list")
        item = get_args(tp)[0]
        out, errors = [], []
        for i, v in enumerate(value):
            try:
                out.append(conv.structure(v, item))
            except Exception as exc:  # noqa: BLE001 - collected, re-raised with the index
                exc.add_note(IterableValidationNote(f"Structuring {tp} @ index {i}", i, item))
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {tp}", errors, tp)
        return tuple(out)

    conv.register_structure_hook_func(is_homogeneous_tuple, strict_tuple)

    conv.register_structure_hook(Any, any_table)
    conv.register_unstructure_hook(HostPort, str)
    return conv


_CONVERTER = _make_converter()


def _error_lines(exc: BaseException, path: str) -> Iterator[str]:
    if isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            yield from _error_lines(sub, path + _note_path(sub))
    elif isinstance(exc, ForbiddenExtraKeysError):
        for key in sorted(exc.extra_fields):
            yield f"{_join(path, key)}: unknown key"
    elif isinstance(exc, ConfigValueError):
        yield f"{path or '(top level)'}: {exc}"
    elif isinstance(exc, KeyError):
        yield f"{path}: required key is missing"
    else:
        yield f"{path or '(top level)'}: invalid value ({type(exc).__name__})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _note_path(exc: BaseException) -> str:
    for note in getattr(exc, "__notes__", ()):
        name = getattr(note, "name", None)
        if name is not None:
            return f".{name}"
        index = getattr(note, "index", None)
        if index is not None:
            return f"[{index}]" if isinstance(index, int) else f".{index}"
    return ""


def structure(raw: Mapping[str, Any], source: str = "") -> Config:
    """Turn a raw mapping (parsed TOML plus overrides) into a Config, or raise
    ConfigError naming every bad key path."""
    try:
        cfg = _CONVERTER.structure(dict(raw), Config)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as exc:
        lines = [line.removeprefix(".") for line in _error_lines(exc, "")]
        raise ConfigError("\n".join(lines)) from None
    cfg = attrs.evolve(cfg, source=source)
    _check_semantics(cfg)
    return cfg


def _positive_counts(cfg: Config) -> list[str]:
    counts = {
        "smtp.max_recipients": cfg.smtp.max_recipients,
        "smtp.max_connections": cfg.smtp.max_connections,
        "smtp.max_connections_per_ip": cfg.smtp.max_connections_per_ip,
        "smtp.auth_max_failures": cfg.smtp.auth_max_failures,
        "smtp.commit_batch_max": cfg.smtp.commit_batch_max,
        "smtp.committers": cfg.smtp.committers,
        "delivery.concurrency": cfg.delivery.concurrency,
        "delivery.max_attempts": cfg.delivery.max_attempts,
        "database.pool_max": cfg.database.pool_max,
    }
    problems = [f"{name}: expected a positive integer" for name, v in counts.items() if v < 1]
    for name, days in (
        ("storage.retention_days", cfg.storage.retention_days),
        ("database.retention_days", cfg.database.retention_days),
    ):
        if days < 0:
            problems.append(f"{name}: expected 0 (keep forever) or a number of days")
    return problems


def _provider_tables(cfg: Config) -> list[str]:
    problems = [
        f"providers.{name}.type: required (a provider type such as 'file')"
        for name, table in cfg.providers.items()
        if not isinstance(table, dict) or not isinstance(table.get("type"), str)
    ]
    route = cfg.delivery.default_route
    if route and route not in cfg.providers:
        problems.append(f"delivery.default_route: no provider named {route!r} under [providers]")
    return problems


def _limits_and_timing(cfg: Config) -> list[str]:
    problems = []
    d = cfg.delivery
    if cfg.smtp.min_data_rate < 0:
        problems.append("smtp.min_data_rate: expected 0 (no limit) or bytes per second")
    if cfg.smtp.max_line_length < 78:
        problems.append("smtp.max_line_length: expected at least 78 (RFC 5322 allows 998)")
    if cfg.smtp.commit_timeout <= 0:
        problems.append("smtp.commit_timeout: expected a duration above 0")
    if d.heartbeat_interval <= 0:
        problems.append("delivery.heartbeat_interval: expected a duration above 0")
    elif d.heartbeat_lifetime < 3 * d.heartbeat_interval:
        problems.append("delivery.heartbeat_lifetime: must be at least 3 heartbeat_interval")
    return problems


def _device_listeners(smtp: SmtpConfig) -> list[str]:
    """A device listener shares its address with no other listener: the same port
    cannot be both the strict kind and the lenient one."""
    taken = {a for a in (*smtp.listen, *smtp.tls_listen) if a.port}
    return [
        f"smtp.device_listen[{i}]: {addr} is also a listener in smtp.listen or "
        "smtp.tls_listen; give the devices a port of their own"
        for i, addr in enumerate(smtp.device_listen)
        if addr in taken
    ]


def _processes(cfg: Config) -> list[str]:
    if not 1 <= cfg.run.processes <= MAX_PROCESSES:
        return [f"run.processes: expected 1 to {MAX_PROCESSES}"]
    if not 0 <= cfg.run.delivery_processes <= MAX_PROCESSES:
        return [f"run.delivery_processes: expected 0 to {MAX_PROCESSES}"]
    if cfg.run.processes == 1:
        return []
    return [
        f"smtp.{key}: {hp.host}:0 cannot be shared by run.processes; give a fixed port"
        for key in ("listen", "tls_listen", "device_listen")
        for hp in getattr(cfg.smtp, key)
        if hp.port == 0
    ]


def _check_semantics(cfg: Config) -> None:
    problems = _positive_counts(cfg) + _provider_tables(cfg) + _limits_and_timing(cfg)
    if not cfg.smtp.listen:
        problems.append("smtp.listen: at least one host:port is required")
    problems += _device_listeners(cfg.smtp) + _processes(cfg)
    if cfg.database.pool_min > cfg.database.pool_max:
        problems.append("database.pool_min: must not exceed database.pool_max")
    if not cfg.delivery.retry_schedule:
        problems.append("delivery.retry_schedule: at least one delay is required")
    if bool(cfg.smtp.tls_cert) != bool(cfg.smtp.tls_key):
        problems.append("smtp.tls_cert: tls_cert and tls_key must be set together")
    if cfg.storage.type == "s3" and not cfg.storage.s3_bucket:
        problems.append("storage.s3_bucket: required when storage.type = 's3'")
    if cfg.health.listen:
        try:
            HostPort.parse(cfg.health.listen)
        except ConfigValueError as exc:
            problems.append(f"health.listen: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))


# -- environment overrides -----------------------------------------------------------

# names of the original design, kept as aliases
ENV_ALIASES = {
    "STORAGE_TYPE": ("storage", "type"),
    "STORAGE_PATH": ("storage", "path"),
    "S3_BUCKET": ("storage", "s3_bucket"),
    "S3_PREFIX": ("storage", "s3_prefix"),
    "S3_ENDPOINT": ("storage", "s3_endpoint"),
    "S3_REGION": ("storage", "s3_region"),
    "LOG_OUTPUT": ("log", "output"),
    "LOG_FILE_PATH": ("log", "file_path"),
    "LOG_MAX_SIZE_MB": ("log", "max_size_mb"),
    "LOG_MAX_FILES": ("log", "max_files"),
    "LOG_CW_GROUP": ("log", "cw_group"),
    "LOG_CW_STREAM": ("log", "cw_stream"),
}


def _sections() -> dict[str, type]:
    attrs.resolve_types(Config)
    sections = {}
    for f in attrs.fields(Config):
        if isinstance(f.type, type) and attrs.has(f.type):
            attrs.resolve_types(f.type)
            sections[f.name] = f.type
    return sections


_SECTIONS = _sections()


def _env_value(var: str, text: str, field_type: Any) -> object:
    """Convert an environment string into the raw TOML-like value for field_type."""
    origin = get_origin(field_type)
    if origin is tuple:
        return [s.strip() for s in text.split(",") if s.strip()]
    if field_type is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{var}: expected true or false")
    if field_type is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{var}: expected an integer") from None
    return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """SMTPPROXY_<SECTION>_<KEY> and the original design's aliases, as raw values."""
    out: dict[str, dict[str, object]] = {}
    targets: list[tuple[str, str, str]] = []
    for var, (section, key) in ENV_ALIASES.items():
        if var in environ:
            targets.append((var, section, key))
    for var in environ:
        if not var.startswith("SMTPPROXY_"):
            continue
        rest = var.removeprefix("SMTPPROXY_").lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS or not key:
            continue  # SMTPPROXY_CONFIG, SMTPPROXY_TEST_* and other non-settings
        names = {f.name for f in attrs.fields(_SECTIONS[section])}
        if key not in names:
            raise ConfigError(f"{var}: no setting {section}.{key}")
        targets.append((var, section, key))
    for var, section, key in targets:
        field = attrs.fields_dict(_SECTIONS[section])[key]
        out.setdefault(section, {})[key] = _env_value(var, environ[var], field.type)
    return out


# -- loading ---------------------------------------------------------------------------


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """--config, then $SMTPPROXY_CONFIG, then ./smtpproxy.toml, /etc/smtpproxy/smtpproxy.toml."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        return path
    if environ.get(CONFIG_ENV):
        path = Path(environ[CONFIG_ENV])
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}: no such file: {path}")
        return path
    for path in DEFAULT_PATHS:
        if path.is_file():
            return path
    return None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge two raw config mappings; over wins."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Find, read, override and validate the configuration."""
    env = os.environ if environ is None else environ
    path = find_config_file(explicit, env)
    if path is None:
        raw: dict[str, Any] = newcomer_defaults(env.get("SMTPPROXY_DATA_DIR"))
        source = ""
    else:
        raw = read_toml(path)
        source = str(path)
    if env.get("SMTPPROXY_DATA_DIR"):
        raw["data_dir"] = env["SMTPPROXY_DATA_DIR"]
    raw = merge(raw, env_overrides(env))
    return structure(raw, source)


# -- showing ---------------------------------------------------------------------------

MASK = "********"


def mask_url(url: str) -> str:
    """Hide the password in scheme://user:password@host URLs and password=... DSNs."""
    scheme, sep, rest = url.partition("://")
    if sep:
        authority, slash, path = rest.partition("/")
        userinfo, at, host = authority.rpartition("@")  # a password may contain "@"
        if at and ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            url = f"{scheme}://{user}:{MASK}@{host}{slash}{path}"
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", rf"\1{MASK}", url)


def mask_secret(value: str) -> str:
    """Mask a secret setting; URLs keep everything but their password."""
    if not value or value == EMBEDDED:
        return value
    if "://" in value or "password=" in value:
        return mask_url(value)
    return MASK


def masked(cfg: Config) -> dict[str, Any]:
    """The effective config as plain data with every secret masked."""

    def walk(obj: Any) -> Any:
        out: dict[str, Any] = {}
        for f in attrs.fields(type(obj)):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if attrs.has(type(value)):
                out[f.name] = walk(value)
            elif f.metadata.get("secret"):
                out[f.name] = mask_secret(value)
            else:
                out[f.name] = _CONVERTER.unstructure(value)
        return out

    data: dict[str, Any] = walk(cfg)
    data["providers"] = {
        name: {k: (MASK if _looks_secret(k) else v) for k, v in table.items()}
        for name, table in cfg.providers.items()
    }
    return data


def _looks_secret(key: str) -> bool:
    return any(word in key.lower() for word in ("secret", "password", "key", "token"))
