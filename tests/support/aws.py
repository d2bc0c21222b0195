"""Local AWS for tests: moto's server on 127.0.0.1 (a free port, in this process), and
dummy AWS settings so that no client reaches a real AWS endpoint.

MotoServer starts and stops the server and keeps one boto3 client of its ``service``
(``shared``) for setting up and inspecting; every client made here names the endpoint,
region and dummy credentials explicitly. tests/support/s3.py and cwlogs.py build on it.
"""

from __future__ import annotations

import itertools
import os
import secrets
from pathlib import Path
from typing import Any, ClassVar, Self

import boto3
import botocore.config
import pytest
from moto.server import ThreadedMotoServer

from tests.support.lifecycle import StartStop
from tests.support.net import closed_port

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"  # moto accepts any credentials


class MotoServer(StartStop):
    """moto in server mode for one AWS service; start() / stop(), or a context manager."""

    service: ClassVar[str]  # the boto3 service name of client(), e.g. "s3"
    access_key: ClassVar[str] = ACCESS_KEY
    secret_key: ClassVar[str] = SECRET_KEY
    region: ClassVar[str] = REGION
    config: ClassVar[botocore.config.Config] = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": 1}
    )

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint = ""
        self._client: Any = None
        self._names = itertools.count()
        self._run = secrets.token_hex(3)

    def start(self) -> Self:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self._client = self.client()
        return self

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._server.stop()

    def client(self) -> Any:
        """A fresh boto3 client of the service for the server (the caller closes it)."""
        session: Any = boto3.session.Session(  # Any: the stubs know services by name only
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )
        return session.client(self.service, endpoint_url=self.endpoint, config=self.config)

    @property
    def shared(self) -> Any:
        """The client for setting up and inspecting, made by start()."""
        assert self._client is not None, f"{type(self).__name__} is not started"
        return self._client

    def unique_name(self, prefix: str) -> str:
        """prefix, then a suffix no other test (of this or another run) gets."""
        return f"{prefix}{self._run}-{next(self._names)}"


def no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **extra: str) -> None:
    """Dummy AWS settings (and the extra variables given): whatever boto3 would pick up
    from the environment leads nowhere. A client built without an explicit endpoint goes
    to a closed port instead of AWS."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
