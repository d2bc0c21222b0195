"""What importing the CLI, and the provider table, loads: `smtpproxy --help` must answer at
once, so the back ends (psycopg, trio, Redis) and the providers' libraries (boto3, the
HTTP clients) are imported by the commands and providers that use them, not up front.

Each check runs in a fresh interpreter: this test process has imported everything."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# what no command needs before it runs, and --help never needs
BACK_ENDS = (
    *("psycopg", "psycopg_pool", "trio", "redis", "loguru", "cattrs", "smtplib"),
    *("smtpproxy.admin", "smtpproxy.config", "smtpproxy.cli.send_test_client"),
)
PROVIDER_LIBRARIES = ("boto3", "botocore", "httpx", "h11", "cryptography")
PROVIDER_MODULES = tuple(
    f"smtpproxy.delivery.providers.{name}"
    for name in ("ses", "msgraph", "graphauth", "sendgrid", "mailgun", "postmark", "smtp", "http")
)


def loaded_after(statements: str, *modules: str) -> list[str]:
    """The modules of `modules` present in sys.modules after running statements in a new
    interpreter."""
    report = f"print(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))"
    code = f"import json, sys\n{statements}\n{report}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded: list[str] = json.loads(out.stdout)
    return loaded


def test_importing_the_cli_loads_no_back_end_and_no_provider() -> None:
    """`import smtpproxy.cli.main` (what every command and --help pays for) loads neither
    a back end nor a provider module nor boto3/httpx."""
    everything = (*BACK_ENDS, *PROVIDER_LIBRARIES, *PROVIDER_MODULES)
    assert loaded_after("import smtpproxy.cli.main", *everything) == []


def test_the_provider_table_imports_no_provider_until_one_is_used() -> None:
    """smtpproxy.delivery.providers knows every type's name without importing a provider
    module; looking up "ses" imports the SES module (and boto3), and nothing else."""
    names = "from smtpproxy.delivery import providers\nassert 'ses' in providers.TYPES"
    assert loaded_after(names, "boto3", *PROVIDER_MODULES) == []
    looked_up = f"{names}\nassert providers.TYPES['ses'].name == 'ses'"
    assert loaded_after(looked_up, "boto3", "smtpproxy.delivery.providers.msgraph") == ["boto3"]


@pytest.mark.parametrize(
    "name", ["file", "sendgrid", "ses", "mailgun", "msgraph", "postmark", "smtp"]
)
def test_every_provider_type_is_found_by_its_name(name: str) -> None:
    """The lazy table maps each type name to the module whose TYPE has that name."""
    from smtpproxy.delivery import providers

    assert providers.TYPES[name].name == name
    assert providers.provider_type(name) is providers.TYPES[name]
