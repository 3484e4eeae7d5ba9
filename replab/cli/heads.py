"""``replab heads ...``: head detectors, OV/QK circuits, composition scores, patterns."""

from __future__ import annotations

import typer

app = typer.Typer(help="Head function: detectors, OV/QK circuits, composition, attention patterns.",
                  no_args_is_help=True)
