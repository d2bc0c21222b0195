"""smtpproxy.toml.example is valid and documents every setting."""

from __future__ import annotations

import re
from pathlib import Path

import attrs

from smtpproxy.config import Config, default_delivery_processes, read_toml, structure

EXAMPLE = Path(__file__).resolve().parents[1] / "smtpproxy.toml.example"


def test_example_config_is_valid() -> None:
    """The example file loads without errors."""
    cfg = structure(read_toml(EXAMPLE), str(EXAMPLE))
    assert cfg.smtp.max_message_size == 25 * 1024 * 1024


def test_example_documents_every_setting() -> None:
    """Every key of every section appears in the example, inside its section."""
    text = EXAMPLE.read_text()
    sections = dict(re.findall(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S))
    missing = []
    for field in attrs.fields(Config):
        if field.metadata.get("internal") or field.name == "providers":
            continue
        if attrs.has(field.type):
            body = sections.get(field.name, "")
            for sub in attrs.fields(field.type):
                if not re.search(rf"^{sub.name} = ", body, re.M):
                    missing.append(f"{field.name}.{sub.name}")
        elif not re.search(rf"^{field.name} = ", text, re.M):
            missing.append(field.name)
    assert missing == []


def test_example_defaults_match_the_code() -> None:
    """Where the example shows a value, it is the built-in default (except data_dir;
    run.delivery_processes as on a machine with two or more cores)."""
    example = structure(read_toml(EXAMPLE), "example")
    default = Config(data_dir=example.data_dir)
    run = attrs.evolve(default.run, delivery_processes=default_delivery_processes(2))
    assert attrs.evolve(example, source="") == attrs.evolve(default, run=run)
