"""A local S3 API for tests: moto's server on 127.0.0.1, a free port, in this process.

    with MotoS3() as s3:
        bucket = s3.new_bucket()
        S3Store(bucket, endpoint=s3.endpoint, **s3.credentials)

Every client made here names the endpoint, region and dummy credentials explicitly, so
nothing reaches a real AWS endpoint. Each ``new_bucket()`` is a fresh, empty bucket.
"""

from __future__ import annotations

from typing import Any

from tests.support.aws import ACCESS_KEY, REGION, SECRET_KEY, MotoServer


class MotoS3(MotoServer):
    """moto's S3 in server mode; start() / stop(), or use it as a context manager."""

    service = "s3"

    @property
    def credentials(self) -> dict[str, str]:
        """S3Store keyword arguments: region and the dummy key pair."""
        return {"region": REGION, "access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY}

    @property
    def s3(self) -> Any:
        """The shared client for setting up and inspecting buckets."""
        return self.shared

    def new_bucket(self) -> str:
        """Create an empty bucket with a name no other test uses; return the name."""
        name = self.unique_name("test-")
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
