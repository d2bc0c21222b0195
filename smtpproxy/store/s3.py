"""S3 message store (AWS S3, MinIO or any S3-compatible service): one object per body.

One boto3 client, created once and shared by every thread (boto3 documents clients as
thread-safe; sessions are not), with max_pool_connections at least the number of
threads that use it, explicit timeouts and standard retries. An acknowledged PutObject
is durable. A PutObject abandoned by cancellation may still complete: the consistency
checker removes such orphans. S3 errors leave this module as StoreUnavailable, a
missing key as BodyNotFound.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import boto3
import botocore.config
import botocore.exceptions

from smtpproxy.errors import BodyNotFound, StoreUnavailable
from smtpproxy.store.base import QUARANTINE, StoredObject, StoreError, get_each

_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)


def _reason(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip(": ")
    return type(exc).__name__


class S3Store:
    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint: str = "",
        region: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
        max_connections: int = 32,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        session = boto3.session.Session(
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            region_name=region or None,
        )
        self._client = session.client(
            "s3",
            endpoint_url=endpoint or None,
            config=botocore.config.Config(
                max_pool_connections=max_connections,
                connect_timeout=5,
                read_timeout=30,
                retries={"mode": "standard", "max_attempts": 3},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_connections, thread_name_prefix="s3-put")

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._client.close()

    def describe(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        return f"S3 bucket {self.bucket}{where}, prefix {self.prefix or '(none)'}"

    def _key(self, key: str) -> str:
        return self.prefix + key

    def put(self, key: str, data: bytes) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType="message/rfc822"
            )
        except _ERRORS as exc:
            raise StoreUnavailable(f"message store: S3 PutObject failed ({_reason(exc)})") from exc

    def put_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if len(items) == 1:
            self.put(*items[0])
            return
        futures = [self._pool.submit(self.put, key, data) for key, data in items]
        errors = [f.exception() for f in futures]
        failed = [e for e in errors if e is not None]
        if failed:
            for (key, _), err in zip(items, errors, strict=True):
                if err is None:
                    self._delete_quietly(key)
            raise failed[0]

    def _delete_quietly(self, key: str) -> None:
        with contextlib.suppress(StoreUnavailable):  # else an orphan for the checker
            self.delete(key)

    def get(self, key: str) -> bytes:
        try:
            obj = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            data: bytes = obj["Body"].read()
        except self._client.exceptions.NoSuchKey:
            raise BodyNotFound(key) from None
        except _ERRORS as exc:
            raise StoreUnavailable(f"message store: S3 GetObject failed ({_reason(exc)})") from exc
        return data

    def get_many(self, keys: Sequence[str]) -> list[bytes | StoreError]:
        """In parallel, on the store's own threads: each GET is a network round trip."""
        if len(keys) == 1:
            return get_each(self.get, keys)
        futures = [self._pool.submit(get_each, self.get, [key]) for key in keys]
        return [f.result()[0] for f in futures]

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except _ERRORS as exc:
            raise StoreUnavailable(
                f"message store: S3 DeleteObject failed ({_reason(exc)})"
            ) from exc

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StoreUnavailable(f"message store: S3 HeadObject failed ({_reason(exc)})") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreUnavailable(f"message store: S3 HeadObject failed ({_reason(exc)})") from exc
        return True

    def quarantine(self, key: str) -> None:
        try:
            self._client.copy_object(
                Bucket=self.bucket,
                Key=self._key(f"{QUARANTINE}/{key}"),
                CopySource={"Bucket": self.bucket, "Key": self._key(key)},
            )
        except self._client.exceptions.NoSuchKey:
            return
        except _ERRORS as exc:
            if isinstance(exc, botocore.exceptions.ClientError) and exc.response.get(
                "Error", {}
            ).get("Code") in ("404", "NoSuchKey"):
                return
            raise StoreUnavailable(f"message store: S3 CopyObject failed ({_reason(exc)})") from exc
        self.delete(key)

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except _ERRORS as exc:
            raise StoreUnavailable(
                f"message store: S3 bucket {self.bucket} ({_reason(exc)})"
            ) from exc

    def iter_objects(self) -> Iterator[StoredObject]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if not key or key.endswith("/") or key.startswith(f"{QUARANTINE}/"):
                        continue  # a "folder" marker some tools create, or quarantined
                    yield StoredObject(key, int(obj["Size"]), obj["LastModified"].timestamp())
        except _ERRORS as exc:
            raise StoreUnavailable(f"message store: S3 listing failed ({_reason(exc)})") from exc
