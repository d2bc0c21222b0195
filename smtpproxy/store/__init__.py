"""Message stores: local files and S3, behind one MessageStore protocol."""

from __future__ import annotations

from smtpproxy.config import Config
from smtpproxy.store.base import MessageStore, StoredObject, key_for

__all__ = ["MessageStore", "StoredObject", "key_for", "open_store"]


def open_store(cfg: Config) -> MessageStore:
    """The store the configuration names."""
    if cfg.storage.type == "local":
        from smtpproxy.store.local import LocalStore

        return LocalStore(
            cfg.storage_path, sync=cfg.storage.sync, min_free_bytes=cfg.smtp.max_message_size
        )
    from smtpproxy.store.s3 import S3Store

    s = cfg.storage
    return S3Store(
        s.s3_bucket,
        prefix=s.s3_prefix,
        endpoint=s.s3_endpoint,
        region=s.s3_region,
        access_key_id=s.s3_access_key_id,
        secret_access_key=s.s3_secret_access_key,
    )
