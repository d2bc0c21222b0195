"""`smtpproxy run`, `check-config` and `gen-secret-key`."""

from __future__ import annotations

import json
import os

import typer
from rich.text import Text

from smtpproxy.cli.common import JsonOption, config, console


def register(app: typer.Typer) -> None:
    @app.command()
    def run(ctx: typer.Context) -> None:
        """Start the relay: SMTP ingress, delivery consumers, retry scheduler, health endpoint.

        Runs until SIGTERM or Ctrl-C, then drains (new sessions get 421, DATA in
        progress and deliveries in flight finish) and exits 0.

        Example: [bold]smtpproxy --config /etc/smtpproxy/smtpproxy.toml run[/bold]
        """
        import trio
        from loguru import logger

        from smtpproxy.observe import logsetup
        from smtpproxy.runtime import heap
        from smtpproxy.runtime.service import run_until_signalled
        from smtpproxy.runtime.workers import Role, process_config, worker_roles

        role = Role.of(os.environ)  # the primary, or a worker it started (run.processes)
        cfg = process_config(config(ctx), role)
        heap.pin_mmap_threshold()  # before any thread starts
        logsetup.configure(cfg)
        if worker_roles(cfg) or not role.primary:  # which process wrote a line
            logger.configure(extra={"worker": role.index})
        trio.run(run_until_signalled, cfg, role)

    @app.command("check-config")
    def check_config(ctx: typer.Context, as_json: bool = JsonOption) -> None:
        """Validate the configuration and print it with every secret masked.

        Example: [bold]smtpproxy -c smtpproxy.toml check-config[/bold]
        """
        from smtpproxy.config import masked

        cfg = config(ctx)
        data = masked(cfg)
        if as_json:
            print(json.dumps({"source": cfg.source or None, "config": data}, indent=2))
            return
        console.print(
            Text.assemble(("config OK", "green"), f" ({cfg.source or 'built-in defaults'})"),
            soft_wrap=True,
        )
        _print_toml(data)

    @app.command("gen-secret-key")
    def gen_secret_key() -> None:
        """Print a new key for security.secret_key (encrypts provider secrets at rest)."""
        from smtpproxy.config.crypto import generate_key

        print(generate_key())


def _toml_value(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _print_toml(data: dict[str, object]) -> None:
    lines = []
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in data.items():
        if isinstance(value, dict):
            nested = {k: v for k, v in value.items() if not isinstance(v, dict)}
            if nested or not value:
                lines.append(f"\n[{key}]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in nested.items()]
            for sub, table in value.items():
                if isinstance(table, dict):
                    lines.append(f"\n[{key}.{sub}]")
                    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    console.print("\n".join(lines), markup=False, highlight=False)
