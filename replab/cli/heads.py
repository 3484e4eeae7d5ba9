"""``replab heads ...``: head detectors, OV/QK circuits, composition scores, patterns."""

from __future__ import annotations

import typer

from replab.cli._common import examples

app = typer.Typer(help="Head function: detectors, OV/QK circuits, composition, attention patterns.",
                  no_args_is_help=True,
                  epilog=examples("replab heads detect", "replab heads ov --tokens weekdays",
                                  "replab heads composition --mode v"))
