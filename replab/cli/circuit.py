"""``replab circuit ...``: validation, block sweeps, hydra, path patching, pruning, edges, report.

Commands are added by the modules that implement them (each registers on :data:`app`).
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Circuits: validate component sets, path patching, pruning, edges, the W1 report.",
                  no_args_is_help=True)
