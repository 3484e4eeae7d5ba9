"""``replab circuit ...``: validation, block sweeps, hydra, path patching, pruning, edges, report.

Commands are added by the modules that implement them (each registers on :data:`app`).
"""

from __future__ import annotations

import typer

from replab.cli._common import examples

app = typer.Typer(help="Circuits: validate component sets, path patching, pruning, edges, the W1 report.",
                  no_args_is_help=True,
                  epilog=examples("replab circuit necessity --task next_day --components L23H3,L29H1",
                                  "replab circuit prune --task next_day --thresholds 0.9,0.8",
                                  "replab circuit report --task fact_recall --prompt-index 0"))
