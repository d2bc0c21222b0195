"""A local CloudWatch Logs API for tests: moto's server on 127.0.0.1, a free port.

    with MotoLogs() as cw:
        cfg = structure({"log": {"output": ["cloudwatch"], **cw.log_settings("grp")}})
        ...
        cw.messages("grp", "stream")

Clients made here name the endpoint, region and dummy credentials explicitly; tests that
let smtpproxy build its own client set the AWS_* environment to the same dummies
(``dummy_aws_environment``), so nothing reaches a real AWS endpoint.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Self

from tests.support.aws import ACCESS_KEY, REGION, SECRET_KEY, MotoServer


def dummy_aws_environment() -> dict[str, str]:
    """AWS_* variables that make the standard credential chain find dummies, read no
    files and never ask an instance metadata service."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class CallLog:
    """Records the parameters of every call a boto3 client makes to one operation
    (through botocore's event hooks: the client itself is the real one)."""

    def __init__(self, client: Any, operation: str) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        service = client.meta.service_model.service_id.hyphenize()
        client.meta.events.register(f"before-parameter-build.{service}.{operation}", self._record)

    def _record(self, params: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.calls.append(dict(params))

    def __len__(self) -> int:
        return len(self.calls)


class MotoLogs(MotoServer):
    """moto in server mode for CloudWatch Logs; start() / stop(), or a context manager."""

    service = "logs"

    def start(self) -> Self:
        # werkzeug logs every request at INFO; smtpproxy routes the standard logging
        # module into its outputs, so these lines would land in the logs under test
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        return super().start()

    @property
    def logs(self) -> Any:
        return self.shared

    def new_group_name(self) -> str:
        """A log group name no other test uses (the group itself is not created)."""
        return self.unique_name("/test/smtpproxy-")

    def create(self, group: str, stream: str) -> None:
        """Create the log group and stream ahead of the code under test."""
        self.logs.create_log_group(logGroupName=group)
        self.logs.create_log_stream(logGroupName=group, logStreamName=stream)

    def log_settings(self, group: str, stream: str = "test-stream") -> dict[str, Any]:
        """The [log] keys that point the cloudwatch output at this server."""
        return {
            "cw_group": group,
            "cw_stream": stream,
            "cw_region": REGION,
            "cw_endpoint": self.endpoint,
        }

    def groups(self) -> list[str]:
        pages = self.logs.get_paginator("describe_log_groups").paginate()
        return [g["logGroupName"] for page in pages for g in page["logGroups"]]

    def streams(self, group: str) -> list[str]:
        pages = self.logs.get_paginator("describe_log_streams").paginate(logGroupName=group)
        return [s["logStreamName"] for page in pages for s in page["logStreams"]]

    def events(self, group: str, stream: str) -> list[dict[str, Any]]:
        """Every event of the stream, oldest first, read with get_log_events."""
        out: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "logGroupName": group,
                "logStreamName": stream,
                "startFromHead": True,
            }
            if token:
                kwargs["nextToken"] = token
            page = self.logs.get_log_events(**kwargs)
            out += page["events"]
            if not page["events"] or page.get("nextForwardToken") in (None, token):
                return out
            token = page["nextForwardToken"]

    def messages(self, group: str, stream: str) -> list[str]:
        return [e["message"] for e in self.events(group, stream)]
