"""`smtpproxy db migrate` and `db status`."""

from __future__ import annotations

import typer

from smtpproxy.cli.common import JsonOption, config, done, emit_rows

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command()
def migrate(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Apply pending schema migrations (safe to run from several hosts at once).

    Example: [bold]smtpproxy db migrate[/bold]
    """
    from smtpproxy import embedded
    from smtpproxy.db import migrate as mig

    applied = mig.migrate(embedded.database_url(config(ctx)))
    names = [f"{m.version:03d}_{m.name}" for m in applied]
    done(
        f"applied {len(names)} migration(s): {', '.join(names)}"
        if names
        else "schema is up to date",
        as_json,
        applied=names,
    )


@app.command()
def status(ctx: typer.Context, as_json: bool = JsonOption) -> None:
    """Show which migrations are applied and which are pending."""
    from smtpproxy import embedded
    from smtpproxy.db import migrate as mig
    from smtpproxy.db.pool import connect

    url = embedded.database_url(config(ctx))
    with connect(url) as conn:
        have = mig.applied_versions(conn)
    rows = [
        {"version": f"{m.version:03d}", "name": m.name, "applied": m.version in have}
        for m in mig.available()
    ]
    emit_rows(rows, ["version", "name", "applied"], as_json, title="migrations")
