"""What importing the CLI, and the provider table, loads: `smtpproxy --help` must answer at
once, so the back ends (psycopg, trio, Redis) and the providers' libraries (botocore for
SES's credential chain, the HTTP clients) are imported by the commands and providers
that use them, not up front.

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
    module; looking up "ses" imports the SES module, and neither boto3 nor botocore (SES
    goes through smtpproxy's own HTTP client) nor another provider."""
    names = "from smtpproxy.delivery import providers\nassert 'ses' in providers.TYPES"
    assert loaded_after(names, "boto3", *PROVIDER_MODULES) == []
    looked_up = f"{names}\nassert providers.TYPES['ses'].name == 'ses'"
    watched = ("boto3", "botocore", "smtpproxy.delivery.providers.msgraph")
    ses = "smtpproxy.delivery.providers.ses"
    assert loaded_after(looked_up, ses, *watched) == [ses]


@pytest.mark.parametrize(
    ("settings", "loaded"),
    [
        ({"region": "eu-west-1", "access_key_id": "AKIDEXAMPLE"}, []),
        ({"region": "eu-west-1"}, ["botocore"]),
    ],
    ids=["access-key", "credential-chain"],
)
def test_an_ses_provider_imports_botocore_only_for_the_aws_environment(
    settings: dict[str, str], loaded: list[str]
) -> None:
    """An SES provider with its own access key and region never imports botocore; one on
    the AWS credential chain does (botocore resolves it), and still not boto3."""
    secret = "'secret'" if "access_key_id" in settings else "None"
    build = (
        "from smtpproxy.delivery.providers import TYPES\n"
        "from smtpproxy.delivery.providers.base import ProviderSpec\n"
        f"spec = ProviderSpec(name='s', type='ses', settings={settings!r}, secret={secret})\n"
        "TYPES['ses'].factory(spec)"
    )
    assert loaded_after(build, "boto3", "botocore") == loaded


@pytest.mark.parametrize(
    "name", ["file", "sendgrid", "ses", "mailgun", "msgraph", "postmark", "smtp"]
)
def test_every_provider_type_is_found_by_its_name(name: str) -> None:
    """The lazy table maps each type name to the module whose TYPE has that name."""
    from smtpproxy.delivery import providers

    assert providers.TYPES[name].name == name
    assert providers.provider_type(name) is providers.TYPES[name]
