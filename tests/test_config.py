"""Configuration: defaults, strict structuring, value types, env overrides, lookup, masking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.config import (
    ENV_ALIASES,
    MASK,
    ConfigValueError,
    HostPort,
    env_overrides,
    load_config,
    masked,
    parse_duration,
    parse_size,
    structure,
)
from smtpproxy.errors import ConfigError

DURATION_HELP = "expected a duration like '30s', '5m' or '2d'"


def config_error(raw: dict[str, Any]) -> str:
    """The message of the ConfigError that structuring raw raises."""
    with pytest.raises(ConfigError) as info:
        structure(raw)
    return str(info.value)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# -- defaults --------------------------------------------------------------------------


def test_defaults_without_a_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no file anywhere, the newcomer defaults apply: embedded servers, file outbox."""
    if Path("/etc/smtpproxy/smtpproxy.toml").exists():
        pytest.skip("a system-wide config file exists on this machine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    data_dir = tmp_path / "xdg" / "smtpproxy"

    cfg = load_config(environ={})

    assert cfg.source == ""
    assert cfg.data_dir == str(data_dir)
    assert cfg.smtp.listen == (HostPort("127.0.0.1", 2525),)
    assert cfg.smtp.max_message_size == 25 * 1024 * 1024
    assert cfg.smtp.max_recipients == 100
    assert cfg.smtp.allow_plaintext_auth is False
    assert cfg.database.url == "embedded"
    assert cfg.redis.url == "embedded"
    assert cfg.uses_embedded
    assert cfg.storage.type == "local"
    assert cfg.storage_path == data_dir / "messages"
    assert cfg.secret_key_file == data_dir / "secret.key"
    assert cfg.log_file_path == data_dir / "smtpproxy.log"
    assert cfg.log.output == ("stdout",)
    assert cfg.health.listen == "127.0.0.1:8025"
    assert cfg.delivery.retry_schedule == (30.0, 60.0, 120.0, 300.0, 900.0, 1800.0)
    assert cfg.delivery.max_age == 2 * 86400.0
    assert cfg.delivery.default_route == "outbox"
    assert cfg.providers == {"outbox": {"type": "file", "path": str(data_dir / "outbox")}}


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SMTPPROXY_DATA_DIR moves the data directory and everything derived from it."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(environ={"SMTPPROXY_DATA_DIR": str(tmp_path / "d")})
    assert cfg.data_dir == str(tmp_path / "d")
    assert cfg.storage_path == tmp_path / "d" / "messages"
    assert cfg.providers["outbox"]["path"] == str(tmp_path / "d" / "outbox")


def test_empty_mapping_structures_to_built_in_defaults() -> None:
    """structure({}) gives the class defaults: no providers and no default route."""
    cfg = structure({})
    assert cfg.providers == {}
    assert cfg.delivery.default_route == ""
    assert cfg.smtp.listen == (HostPort("127.0.0.1", 2525),)


# -- structure(): errors name key paths ------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"smtp": {"listen": ["nope"]}}, "smtp.listen[0]: expected host:port"),
        ({"smtp": {"listen": ["a:1", 25]}}, "smtp.listen[1]: expected host:port"),
        ({"smtp": {"max_recipients": "5"}}, "smtp.max_recipients: expected an integer"),
        ({"smtp": {"max_recipients": True}}, "smtp.max_recipients: expected an integer"),
        ({"smtp": {"max_recipients": 2.5}}, "smtp.max_recipients: expected an integer"),
        ({"smtp": {"hostname": 7}}, "smtp.hostname: expected a string"),
        ({"smtp": {"bogus": 1}}, "smtp.bogus: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"delivery": {"max_age": "forever"}}, f"delivery.max_age: {DURATION_HELP}"),
        (
            {"delivery": {"retry_schedule": ["1s", "x"]}},
            f"delivery.retry_schedule[1]: {DURATION_HELP}",
        ),
        ({"storage": {"type": "ftp"}}, "storage.type: expected one of 'local', 's3'"),
        ({"run": {"processes": "2"}}, "run.processes: expected an integer"),
        (
            {"log": {"output": ["stdout", "syslog"]}},
            "log.output[1]: expected one of 'stdout', 'file', 'cloudwatch'",
        ),
    ],
)
def test_structure_errors_name_the_key_path(raw: dict[str, Any], message: str) -> None:
    """Each wrongly shaped value is reported as '<key path>: <what was expected>'."""
    assert config_error(raw) == message


@pytest.mark.parametrize("value", ["true", "yes", "false", 1, 0])
def test_booleans_must_be_booleans(value: object) -> None:
    """Strings and numbers are not accepted where true or false is expected."""
    raw = {"smtp": {"allow_plaintext_auth": value}}
    assert config_error(raw) == "smtp.allow_plaintext_auth: expected true or false"


def test_several_errors_are_reported_together() -> None:
    """Every bad key is reported, one per line, in a single ConfigError."""
    raw = {
        "smtp": {"listen": ["127.0.0.1:25", "bad"], "max_recipients": "many", "bogus": 1},
        "delivery": {"max_age": "x"},
    }
    assert config_error(raw).splitlines() == [
        "smtp.listen[1]: expected host:port",
        "smtp.max_recipients: expected an integer",
        "smtp.bogus: unknown key",
        f"delivery.max_age: {DURATION_HELP}",
    ]


def test_string_for_a_list_setting_is_rejected() -> None:
    """A single string where a list of durations is expected is a ConfigError."""
    assert config_error({"delivery": {"retry_schedule": "35"}}).startswith(
        "delivery.retry_schedule:"
    )


def test_source_is_recorded() -> None:
    """structure() records where the raw mapping came from."""
    assert structure({}, source="/etc/x.toml").source == "/etc/x.toml"


# -- value types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:25", HostPort("127.0.0.1", 25)),
        (" 10.0.0.1:587 ", HostPort("10.0.0.1", 587)),
        ("mail.example.com:2525", HostPort("mail.example.com", 2525)),
        ("[::1]:25", HostPort("::1", 25)),
        ("[2001:db8::5]:465", HostPort("2001:db8::5", 465)),
        (":25", HostPort("0.0.0.0", 25)),
        ("0.0.0.0:65535", HostPort("0.0.0.0", 65535)),
        ("localhost:0", HostPort("localhost", 0)),
    ],
)
def test_hostport_parses(text: str, expected: HostPort) -> None:
    """host:port, [ipv6]:port and :port (all interfaces) parse to host and port."""
    assert HostPort.parse(text) == expected


@pytest.mark.parametrize(
    "text", ["127.0.0.1", "127.0.0.1:65536", "127.0.0.1:123456", "::1:25", "[::1]", "a b:25", ""]
)
def test_hostport_rejects(text: str) -> None:
    """Missing ports, ports above 65535, unbracketed IPv6 and spaces are rejected."""
    with pytest.raises(ConfigValueError, match="expected host:port"):
        HostPort.parse(text)


def test_hostport_str_round_trips() -> None:
    """str() brackets IPv6 hosts so the text parses back to the same value."""
    for hp in (HostPort("::1", 25), HostPort("127.0.0.1", 2525)):
        assert HostPort.parse(str(hp)) == hp
    assert str(HostPort("::1", 25)) == "[::1]:25"


def test_listen_addresses_through_structure() -> None:
    """smtp.listen strings become HostPort values in order."""
    cfg = structure({"smtp": {"listen": [":25", "[::1]:587"]}})
    assert cfg.smtp.listen == (HostPort("0.0.0.0", 25), HostPort("::1", 587))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("2d", 172800),
        ("1.5h", 5400),
        (" 10 ", 10),
        (45, 45),
        (1.5, 1.5),
        (0, 0),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    """Durations accept ms/s/m/h/d suffixes, bare numbers of seconds, and numbers."""
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["5 weeks", "-1s", "s", "", True, None, -3, [1]])
def test_bad_durations(value: object) -> None:
    """Unknown units, negatives, booleans and other types are rejected."""
    with pytest.raises(ConfigValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("10MiB", 10 * 1024**2),
        ("25MB", 25_000_000),
        ("25mb", 25_000_000),
        ("2 KiB", 2048),
        ("1kb", 1000),
        ("1GB", 10**9),
        ("7", 7),
        ("7b", 7),
        (10485760, 10485760),
    ],
)
def test_sizes(value: object, size: int) -> None:
    """Sizes accept integers and decimal or binary unit suffixes, case-insensitively."""
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["10TB", "1.5MB", "-1", "", True, 1.5, -1])
def test_bad_sizes(value: object) -> None:
    """Unknown units, fractions, negatives, booleans and floats are rejected."""
    with pytest.raises(ConfigValueError):
        parse_size(value)


def test_durations_and_sizes_through_structure() -> None:
    """Duration and size settings are converted when the config is structured."""
    cfg = structure(
        {"smtp": {"max_message_size": "10MiB", "timeout": "5m"}, "delivery": {"max_age": "2d"}}
    )
    assert cfg.smtp.max_message_size == 10 * 1024**2
    assert cfg.smtp.timeout == 300.0
    assert cfg.delivery.max_age == 172800.0


# -- environment overrides ---------------------------------------------------------------


def test_env_listen_is_a_comma_list() -> None:
    """SMTPPROXY_SMTP_LISTEN is split on commas, blanks dropped."""
    assert env_overrides({"SMTPPROXY_SMTP_LISTEN": "0.0.0.0:25, [::1]:587,"}) == {
        "smtp": {"listen": ["0.0.0.0:25", "[::1]:587"]}
    }


@pytest.mark.parametrize(
    ("text", "value"),
    [("yes", True), ("no", False), ("true", True), ("false", False), ("TRUE", True), ("0", False)],
)
def test_env_booleans(text: str, value: bool) -> None:
    """Boolean variables accept yes/no, true/false, 1/0, case-insensitively."""
    got = env_overrides({"SMTPPROXY_SMTP_ALLOW_PLAINTEXT_AUTH": text})
    assert got == {"smtp": {"allow_plaintext_auth": value}}


def test_env_bad_boolean_names_the_variable() -> None:
    """A value that is not a boolean is reported against the variable name."""
    with pytest.raises(ConfigError) as info:
        env_overrides({"SMTPPROXY_SMTP_ALLOW_PLAINTEXT_AUTH": "maybe"})
    assert str(info.value) == "SMTPPROXY_SMTP_ALLOW_PLAINTEXT_AUTH: expected true or false"


def test_env_bad_integer_names_the_variable() -> None:
    """A non-integer for an integer setting is reported against the variable name."""
    with pytest.raises(ConfigError) as info:
        env_overrides({"SMTPPROXY_SMTP_MAX_RECIPIENTS": "many"})
    assert str(info.value) == "SMTPPROXY_SMTP_MAX_RECIPIENTS: expected an integer"


def test_env_unknown_key_in_known_section() -> None:
    """A misspelt setting in a known section is an error naming the variable."""
    with pytest.raises(ConfigError) as info:
        env_overrides({"SMTPPROXY_SMTP_LISTN": "0.0.0.0:25"})
    assert str(info.value) == "SMTPPROXY_SMTP_LISTN: no setting smtp.listn"


def test_env_unrelated_variables_are_ignored() -> None:
    """SMTPPROXY_CONFIG, SMTPPROXY_TEST_*, SMTPPROXY_DATA_DIR and others are not settings."""
    environ = {
        "SMTPPROXY_CONFIG": "/etc/x.toml",
        "SMTPPROXY_TEST_DATABASE_URL": "postgresql://localhost/x",
        "SMTPPROXY_DATA_DIR": "/srv",
        "PATH": "/usr/bin",
        "HOME": "/root",
    }
    assert env_overrides(environ) == {}


def test_env_overrides_the_file(tmp_path: Path) -> None:
    """An environment variable wins over the same setting in the file."""
    path = write(tmp_path / "c.toml", "[smtp]\nmax_recipients = 5\nlisten = ['1.2.3.4:25']\n")
    cfg = load_config(path, environ={"SMTPPROXY_SMTP_MAX_RECIPIENTS": "7"})
    assert cfg.smtp.max_recipients == 7
    assert cfg.smtp.listen == (HostPort("1.2.3.4", 25),)


def test_env_values_are_validated_like_the_file(tmp_path: Path) -> None:
    """Env strings go through the same structuring: durations, sizes, host:port lists."""
    environ = {
        "SMTPPROXY_SMTP_LISTEN": ":25,[::1]:587",
        "SMTPPROXY_SMTP_MAX_MESSAGE_SIZE": "10MiB",
        "SMTPPROXY_DELIVERY_MAX_AGE": "1d",
        "SMTPPROXY_DELIVERY_RETRY_SCHEDULE": "10s,1m",
    }
    cfg = load_config(write(tmp_path / "c.toml", ""), environ=environ)
    assert cfg.smtp.listen == (HostPort("0.0.0.0", 25), HostPort("::1", 587))
    assert cfg.smtp.max_message_size == 10 * 1024**2
    assert cfg.delivery.max_age == 86400.0
    assert cfg.delivery.retry_schedule == (10.0, 60.0)


ALIAS_CASES = [
    ("STORAGE_TYPE", "s3", "storage", "type", "s3"),
    ("STORAGE_PATH", "/srv/messages", "storage", "path", "/srv/messages"),
    ("S3_BUCKET", "mail-bodies", "storage", "s3_bucket", "mail-bodies"),
    ("S3_PREFIX", "prod/", "storage", "s3_prefix", "prod/"),
    ("S3_ENDPOINT", "http://minio:9000", "storage", "s3_endpoint", "http://minio:9000"),
    ("S3_REGION", "eu-west-1", "storage", "s3_region", "eu-west-1"),
    ("LOG_OUTPUT", "stdout,file", "log", "output", ("stdout", "file")),
    ("LOG_FILE_PATH", "/var/log/smtpproxy.log", "log", "file_path", "/var/log/smtpproxy.log"),
    ("LOG_MAX_SIZE_MB", "50", "log", "max_size_mb", 50),
    ("LOG_MAX_FILES", "3", "log", "max_files", 3),
    ("LOG_CW_GROUP", "mail", "log", "cw_group", "mail"),
    ("LOG_CW_STREAM", "host-1", "log", "cw_stream", "host-1"),
]


def test_alias_cases_cover_every_alias() -> None:
    """The alias table below tests every entry of ENV_ALIASES with its target."""
    assert {var: (s, k) for var, _, s, k, _ in ALIAS_CASES} == ENV_ALIASES


@pytest.mark.parametrize(("var", "text", "section", "key", "expected"), ALIAS_CASES)
def test_env_alias_lands_in_its_setting(
    tmp_path: Path, var: str, text: str, section: str, key: str, expected: object
) -> None:
    """Each original-design alias sets its section.key through load_config."""
    path = write(tmp_path / "c.toml", "[storage]\ns3_bucket = 'from-file'\n")
    cfg = load_config(path, environ={var: text})
    assert getattr(getattr(cfg, section), key) == expected


def test_all_aliases_together(tmp_path: Path) -> None:
    """All aliases set at once each land in their own setting."""
    path = write(tmp_path / "c.toml", "")
    cfg = load_config(path, environ={var: text for var, text, *_ in ALIAS_CASES})
    for _, _, section, key, expected in ALIAS_CASES:
        assert getattr(getattr(cfg, section), key) == expected, f"{section}.{key}"


# -- file lookup ---------------------------------------------------------------------------


@pytest.fixture
def three_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """./smtpproxy.toml, $SMTPPROXY_CONFIG and --config files with max_recipients 1, 2, 3."""
    monkeypatch.chdir(tmp_path)
    return {
        "cwd": write(tmp_path / "smtpproxy.toml", "[smtp]\nmax_recipients = 1\n"),
        "env": write(tmp_path / "env.toml", "[smtp]\nmax_recipients = 2\n"),
        "explicit": write(tmp_path / "explicit.toml", "[smtp]\nmax_recipients = 3\n"),
    }


def test_explicit_path_wins(three_configs: dict[str, str]) -> None:
    """--config is used even when $SMTPPROXY_CONFIG and ./smtpproxy.toml exist."""
    cfg = load_config(three_configs["explicit"], {"SMTPPROXY_CONFIG": three_configs["env"]})
    assert cfg.smtp.max_recipients == 3
    assert cfg.source == three_configs["explicit"]


def test_env_path_beats_working_directory(three_configs: dict[str, str]) -> None:
    """Without --config, $SMTPPROXY_CONFIG is used before ./smtpproxy.toml."""
    cfg = load_config(None, {"SMTPPROXY_CONFIG": three_configs["env"]})
    assert cfg.smtp.max_recipients == 2
    assert cfg.source == three_configs["env"]


def test_working_directory_file_is_found(three_configs: dict[str, str]) -> None:
    """Without --config or $SMTPPROXY_CONFIG, ./smtpproxy.toml is read."""
    cfg = load_config(None, {})
    assert cfg.smtp.max_recipients == 1
    assert cfg.source == "smtpproxy.toml"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    """A --config path that does not exist is a ConfigError, not a fallback."""
    with pytest.raises(ConfigError, match=r"^--config: no such file: "):
        load_config(str(tmp_path / "nope.toml"), {})


def test_missing_env_file_is_an_error(tmp_path: Path) -> None:
    """A $SMTPPROXY_CONFIG path that does not exist is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=r"^SMTPPROXY_CONFIG: no such file: "):
        load_config(None, {"SMTPPROXY_CONFIG": str(tmp_path / "nope.toml")})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is a ConfigError starting with the file's path."""
    path = write(tmp_path / "broken.toml", "[smtp\nlisten = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(f"{path}: not valid TOML")


def test_file_errors_name_key_paths(tmp_path: Path) -> None:
    """Errors in a file are reported by key path, like structure() errors."""
    path = write(tmp_path / "c.toml", "[smtp]\nlisten = ['nope']\n")
    with pytest.raises(ConfigError, match=r"^smtp\.listen\[0\]: expected host:port$"):
        load_config(path, {})


# -- semantic checks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"smtp": {"tls_cert": "/c.pem"}},
            "smtp.tls_cert: tls_cert and tls_key must be set together",
        ),
        (
            {"smtp": {"tls_key": "/k.pem"}},
            "smtp.tls_cert: tls_cert and tls_key must be set together",
        ),
        ({"storage": {"type": "s3"}}, "storage.s3_bucket: required when storage.type = 's3'"),
        (
            {"delivery": {"default_route": "sendgrid"}},
            "delivery.default_route: no provider named 'sendgrid' under [providers]",
        ),
        (
            {"database": {"pool_min": 5, "pool_max": 4}},
            "database.pool_min: must not exceed database.pool_max",
        ),
        (
            {"database": {"pool_max": 0, "pool_min": 0}},
            "database.pool_max: expected a positive integer",
        ),
        ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients: expected a positive integer"),
        ({"smtp": {"listen": []}}, "smtp.listen: at least one host:port is required"),
        ({"run": {"processes": 0}}, "run.processes: expected 1 to 64"),
        ({"run": {"delivery_processes": -1}}, "run.delivery_processes: expected 0 to 64"),
        (
            {"run": {"processes": 2}, "smtp": {"listen": ["127.0.0.1:0"]}},
            "smtp.listen: 127.0.0.1:0 cannot be shared by run.processes; give a fixed port",
        ),
        (
            {"delivery": {"retry_schedule": []}},
            "delivery.retry_schedule: at least one delay is required",
        ),
        ({"health": {"listen": "nope"}}, "health.listen: expected host:port"),
        (
            {"providers": {"sg": {"api_key": "k"}}},
            "providers.sg.type: required (a provider type such as 'file')",
        ),
    ],
)
def test_semantic_checks(raw: dict[str, Any], message: str) -> None:
    """Well-typed but inconsistent settings are rejected with the key path."""
    assert config_error(raw) == message


def test_semantic_checks_pass_for_consistent_settings() -> None:
    """TLS cert with key, s3 with bucket, and a default route naming a provider are fine."""
    cfg = structure(
        {
            "smtp": {"tls_cert": "/c.pem", "tls_key": "/k.pem"},
            "storage": {"type": "s3", "s3_bucket": "b"},
            "database": {"pool_min": 4, "pool_max": 4},
            "delivery": {"default_route": "sg"},
            "providers": {"sg": {"type": "sendgrid"}},
            "health": {"listen": ""},
        }
    )
    assert cfg.delivery.default_route == "sg"
    assert cfg.storage.s3_bucket == "b"


def test_semantic_problems_are_reported_together() -> None:
    """Several semantic problems come back in one ConfigError, one per line."""
    lines = config_error({"smtp": {"tls_cert": "/c.pem"}, "storage": {"type": "s3"}}).splitlines()
    assert sorted(lines) == [
        "smtp.tls_cert: tls_cert and tls_key must be set together",
        "storage.s3_bucket: required when storage.type = 's3'",
    ]


# -- masking ---------------------------------------------------------------------------

SECRETS = [
    "hunter2",
    "r3dis-pw",
    "AWS/SECRET+key",
    "FERNET-KEY-VALUE",
    "SG.api-key",
    "cl1ent",
    "tok3n",
]


def test_masked_hides_every_secret() -> None:
    """masked() shows the config without any secret value, passwords in URLs included."""
    cfg = structure(
        {
            "database": {"url": "postgresql://app:hunter2@db.internal:5432/mail"},
            "redis": {"url": "redis://:r3dis-pw@cache:6379/0"},
            "storage": {"type": "s3", "s3_bucket": "b", "s3_secret_access_key": "AWS/SECRET+key"},
            "security": {"secret_key": "FERNET-KEY-VALUE"},
            "providers": {
                "sg": {"type": "sendgrid", "api_key": "SG.api-key", "region": "eu"},
                "graph": {"type": "graph", "client_secret": "cl1ent", "server_token": "tok3n"},
            },
        }
    )
    shown = masked(cfg)
    text = json.dumps(shown)
    for value in SECRETS:
        assert value not in text
    assert shown["database"]["url"] == f"postgresql://app:{MASK}@db.internal:5432/mail"
    assert shown["redis"]["url"] == f"redis://:{MASK}@cache:6379/0"
    assert shown["storage"]["s3_secret_access_key"] == MASK
    assert shown["security"]["secret_key"] == MASK
    assert shown["providers"]["sg"] == {"type": "sendgrid", "api_key": MASK, "region": "eu"}
    assert shown["providers"]["graph"]["client_secret"] == MASK
    assert shown["providers"]["graph"]["server_token"] == MASK


def test_masked_keeps_non_secrets_visible() -> None:
    """'embedded', empty secrets and ordinary settings are shown as they are."""
    shown = masked(structure({"smtp": {"listen": ["[::1]:25"]}}))
    assert shown["database"]["url"] == "embedded"
    assert shown["redis"]["url"] == "embedded"
    assert shown["security"]["secret_key"] == ""
    assert shown["smtp"]["listen"] == ["[::1]:25"]
    assert "source" not in shown


@pytest.mark.parametrize(
    ("section", "url", "password"),
    [
        ("database", "host=db password=hunter2 user=app", "hunter2"),
        ("database", "postgresql://db/mail?password=hunter2&sslmode=require", "hunter2"),
        pytest.param(
            "database",
            "host=db password='two words' user=app",
            "words",
        ),
        pytest.param(
            "redis",
            "redis://:top@secret@cache:6379/0",
            "secret",
        ),
    ],
)
def test_masked_hides_passwords_in_other_url_forms(section: str, url: str, password: str) -> None:
    """Passwords in key=value DSNs, query strings and unusual URLs are masked too."""
    shown = masked(structure({section: {"url": url}}))
    assert password not in shown[section]["url"]
    assert MASK in shown[section]["url"]
