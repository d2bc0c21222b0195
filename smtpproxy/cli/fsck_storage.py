"""`smtpproxy fsck-storage`: check (and with --repair, fix) PostgreSQL, the message store
and the stream against each other. Meant for cron; exit 0 consistent, 1 problems found
(repaired or not), 2 the check itself failed."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.text import Text

from smtpproxy.cli.common import config, console, ensure_schema, error_line

if TYPE_CHECKING:
    from rich.progress import Progress


def register(app: typer.Typer) -> None:
    @app.command("fsck-storage")
    def fsck_storage(
        ctx: typer.Context,
        repair: bool = typer.Option(
            False, "--repair", help="Fix what is found (default: report only)."
        ),
        verify: bool = typer.Option(
            False, "--verify", help="Also read every stored body and check its size and SHA-256."
        ),
        quarantine: bool = typer.Option(
            False, "--quarantine", help="Same as --orphans quarantine."
        ),
        orphans: str = typer.Option(
            None,
            "--orphans",
            help="With --repair, orphan bodies are: quarantine (moved under quarantine/), "
            "delete, or report (left alone). Default: storage.orphan_action.",
        ),
        grace: str = typer.Option(
            None,
            "--grace",
            help="Leave bodies and refused messages younger than this alone "
            "(default: storage.orphan_grace).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Check that PostgreSQL, the message store and the queue agree.

        Reports live messages whose body is missing, stored bodies no message refers to,
        messages refused with 451 that were not cleaned up, queued messages missing from
        the stream, and (with --verify) bodies that differ from what was accepted. Safe
        while `smtpproxy run` is delivering. A dry run unless --repair.

        Cron example:
        [bold]17 3 * * * smtpproxy fsck-storage --repair --json > /var/log/fsck.json[/bold]
        """
        from smtpproxy.config import ConfigValueError, parse_duration
        from smtpproxy.errors import ConfigError, UnavailableError, UsageError
        from smtpproxy.ops import fsck
        from smtpproxy.runtime.resources import open_resources

        cfg = config(ctx)
        overrides: dict[str, Any] = {"repair": repair, "verify": verify}
        action = "quarantine" if quarantine else (orphans or cfg.storage.orphan_action)
        if action not in ("quarantine", "delete", "report"):
            raise ConfigError("--orphans: expected quarantine, delete or report")
        overrides["orphan_action"] = action
        if grace is not None:
            try:
                overrides["grace"] = parse_duration(grace)
            except ConfigValueError as exc:
                raise ConfigError(f"--grace: {exc}") from None
        try:
            ensure_schema(cfg)
            res = open_resources(cfg)
        except (UnavailableError, UsageError) as exc:
            error_line(f"error: {exc}")
            raise typer.Exit(2) from None
        try:
            with _progress(as_json) as progress:
                checker = fsck.Checker(res, fsck.options_from_config(res, **overrides), progress)
                results = checker.run()
        except (UnavailableError, fsck.AlreadyRunning) as exc:
            error_line(f"error: {exc}")
            raise typer.Exit(2) from None
        finally:
            res.close()
        problems = sum(r.problems for r in results)
        repaired = sum(r.repaired for r in results if r.name != "retention")
        if as_json:
            print(
                json.dumps(
                    {
                        "consistent": problems == 0,
                        "repair": repair,
                        "problems": problems,
                        "repaired": repaired,
                        "checks": [r.as_dict() for r in results],
                    },
                    indent=2,
                )
            )
        else:
            _summary(results, repair, problems, repaired)
        raise typer.Exit(1 if problems else 0)


class _Reporter:
    """Progress as a rich bar on a terminal, plain lines otherwise, nothing for --json."""

    def __init__(self, quiet: bool) -> None:
        self._bar: Progress | None = None
        self._tasks: dict[str, Any] = {}
        self._last: dict[str, int] = {}
        self._quiet = quiet
        if not quiet and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._bar = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,} items"),
                TimeElapsedColumn(),
                console=console.__class__(stderr=True),
                transient=True,
            )

    def __enter__(self) -> _Reporter:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, name: str, done: int) -> None:
        if self._quiet:
            return
        if self._bar is not None:
            if name not in self._tasks:
                self._tasks[name] = self._bar.add_task(name, total=None)
            self._bar.update(self._tasks[name], completed=done)
        elif done - self._last.get(name, 0) >= 10_000 or name not in self._last:
            self._last[name] = done
            sys.stderr.write(f"{name}: {done} checked\n")


def _progress(quiet: bool) -> _Reporter:
    return _Reporter(quiet)


def _summary(results: list[Any], repair: bool, problems: int, repaired: int) -> None:
    table = Table(title="storage check", title_justify="left")
    for col in ("check", "checked", "problems", "repaired", "examples"):
        table.add_column(
            col, justify="right" if col in ("checked", "problems", "repaired") else "left"
        )
    for r in results:
        table.add_row(
            r.name,
            f"{r.checked:,}",
            f"{r.problems:,}",
            f"{r.repaired:,}",
            Text(", ".join(r.examples[:3]) + (" ..." if len(r.examples) > 3 else "")),
        )
    console.print(table)
    if not problems:
        console.print(Text("consistent", style="green"))
    elif repair:
        console.print(Text(f"{problems} problems found, {repaired} repaired", style="yellow"))
    else:
        console.print(
            Text(
                f"{problems} problems found (dry run: nothing changed; use --repair to fix)",
                style="red",
            )
        )
