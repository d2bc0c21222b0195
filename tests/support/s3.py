"""A local S3 API for tests: moto's server on 127.0.0.1, a free port, in this process.

    with MotoS3() as s3:
        bucket = s3.new_bucket()
        S3Store(bucket, endpoint=s3.endpoint, **s3.credentials)

Every client made here names the endpoint, region and dummy credentials explicitly, so
nothing reaches a real AWS endpoint. Each ``new_bucket()`` is a fresh, empty bucket.
"""

from __future__ import annotations

import itertools
import secrets
from types import TracebackType
from typing import Any

import boto3
import botocore.config
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"  # moto accepts any credentials


class MotoS3:
    """moto's S3 in server mode; start() / stop(), or use it as a context manager."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._names = itertools.count()
        self._run = secrets.token_hex(3)
        self.endpoint = ""
        self._client: Any = None

    def start(self) -> MotoS3:
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

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def credentials(self) -> dict[str, str]:
        """S3Store keyword arguments: region and the dummy key pair."""
        return {"region": REGION, "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY}

    def client(self) -> Any:
        """A fresh boto3 S3 client for the server (the caller closes it)."""
        return boto3.session.Session(
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        ).client(
            "s3",
            endpoint_url=self.endpoint,
            config=botocore.config.Config(retries={"mode": "standard", "max_attempts": 1}),
        )

    @property
    def s3(self) -> Any:
        """The shared client for setting up and inspecting buckets."""
        assert self._client is not None, "MotoS3 is not started"
        return self._client

    def new_bucket(self) -> str:
        """Create an empty bucket with a name no other test uses; return the name."""
        name = f"test-{self._run}-{next(self._names)}"
        self.s3.create_bucket(Bucket=name)
        return name

    def drop_bucket(self, name: str) -> None:
        """Delete every object in the bucket, then the bucket."""
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=name):
            objects = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if objects:
                self.s3.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
        self.s3.delete_bucket(Bucket=name)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in the bucket under prefix, as S3 lists them."""
        paginator = self.s3.get_paginator("list_objects_v2")
        return [
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]
