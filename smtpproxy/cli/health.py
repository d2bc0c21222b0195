"""`smtpproxy health`: ask a running instance's health endpoint; exit 0 when it is ready."""

from __future__ import annotations

import json
from typing import Any

import typer

from smtpproxy.cli.common import JsonOption, config, error_line, say
from smtpproxy.errors import UsageError

_LOCAL = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - mapping, not binding


def endpoint_url(listen: str) -> str:
    """The URL that reaches health.listen from this machine (a wildcard address means
    any interface, so loopback is used)."""
    if not listen:
        raise UsageError("health.listen is empty (the endpoint is disabled): pass --url")
    from smtpproxy.config import HostPort

    address = HostPort.parse(listen)
    host = _LOCAL.get(address.host, address.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{address.port}"


def register(app: typer.Typer) -> None:
    @app.command()
    def health(
        ctx: typer.Context,
        url: str = typer.Option(
            "", "--url", help="Base URL of the endpoint (default: from health.listen)."
        ),
        live: bool = typer.Option(
            False, "--live", help="Only check that the process answers (/healthz)."
        ),
        timeout: float = typer.Option(5.0, "--timeout", min=0.1, help="Seconds to wait."),
        as_json: bool = JsonOption,
    ) -> None:
        """Query the health endpoint of a running smtpproxy: exit 0 when it is ready
        (PostgreSQL, Redis, the message store and the SMTP listeners answer, and the
        delivery backlog is under smtp.max_queue_depth), 1 otherwise, naming what fails.

        For a container HEALTHCHECK or a monitoring script.

        Examples:
          [bold]smtpproxy health[/bold]
          [bold]smtpproxy health --live --url http://10.0.0.5:8025[/bold]
        """
        import httpx

        base = url.rstrip("/") if url else endpoint_url(config(ctx).health.listen)
        path = "/healthz" if live else "/readyz"
        try:
            resp = httpx.get(base + path, timeout=timeout)
            body: dict[str, Any] = resp.json()
        except httpx.HTTPError as exc:
            _fail(as_json, base + path, f"no answer: {exc}")
        except ValueError:
            _fail(as_json, base + path, f"not a health endpoint (HTTP {resp.status_code})")
        ok = resp.status_code == 200
        if as_json:
            print(json.dumps({"url": base + path, "http_status": resp.status_code, **body}))
        else:
            _human(body, ok)
        if not ok:
            raise typer.Exit(1)


def _fail(as_json: bool, url: str, why: str) -> None:
    if as_json:
        print(json.dumps({"url": url, "status": "unreachable", "error": why}))
    else:
        error_line(f"error: {url}: {why}")
    raise typer.Exit(1)


def _human(body: dict[str, Any], ok: bool) -> None:
    status = str(body.get("status", "unknown"))
    failing = body.get("failing") or []
    say(status if ok or not failing else f"{status}: {', '.join(failing)}")
    for name, result in (body.get("checks") or {}).items():
        say(f"  {name}: {result}")
