"""``replab store ...``: inspect and verify activation stores."""

from __future__ import annotations

from pathlib import Path

import typer

from replab.cli._common import JSON_OPT, examples, human_console, print_json

app = typer.Typer(help="Inspect and verify activation stores.", no_args_is_help=True)


@app.command("info", epilog=examples("replab store info runs/superset", "replab store info runs/superset --json"))
def info(store: Path = typer.Argument(..., help="Store directory."), json_out: bool = JSON_OPT):
    """Summarise a store: model, dataset, rows, hooks, size, label counts."""
    from replab.store import open_store

    summary = open_store(store).summary()
    if json_out:
        print_json(summary)
        return
    from rich.table import Table

    table = Table(title=f"activation store {store}", show_header=False)
    for key, value in summary.items():
        if key != "label_counts":
            table.add_row(key, f"{value:,}" if key == "bytes" else str(value))
    for column, counts in summary["label_counts"].items():
        table.add_row(f"labels: {column}", ", ".join(f"{k}={v}" for k, v in counts.items()))
    human_console().print(table)


@app.command("verify", epilog=examples("replab store verify runs/superset"))
def verify(store: Path = typer.Argument(..., help="Store directory."), json_out: bool = JSON_OPT):
    """Check every file of a store against the sha256 sums in its manifest."""
    from replab.store import open_store

    s = open_store(store, verify=True)
    if json_out:
        print_json({"path": str(store), "ok": True, "files": len(s.hooks) + 1})
    else:
        typer.echo(f"ok: {store} ({len(s.hooks)} tensor files and the index match their checksums)")
