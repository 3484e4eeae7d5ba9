"""Run directories: what every command writes, and how a finished one is recognised.

A *run* is one execution of a command (``replab patch sweep``, ``replab features scan`` ...);
it writes a run directory: tables (Parquet + CSV), figures (PNG + SVG), then
``summary.json`` **last**, with the model identity and the replab version. The directory is
complete only when ``summary.json`` exists: :func:`start_run` removes an old one first and
:func:`finish_run` writes the new one atomically, so an interrupted run never looks finished.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from replab._version import __version__
from replab.io import write_json_atomic


def start_run(out) -> Path:
    """Create ``out`` and remove a previous ``summary.json`` (the completion marker)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    return out


def write_table(df: pd.DataFrame, out: Path, stem: str) -> list[str]:
    """``<stem>.parquet`` and ``<stem>.csv`` (list columns are JSON-encoded in the CSV)."""
    import json

    df.to_parquet(out / f"{stem}.parquet", index=False)
    csv = df.copy()
    for c in csv.columns:
        if csv[c].map(lambda v: isinstance(v, (list, tuple))).any():
            csv[c] = csv[c].map(json.dumps)
    csv.to_csv(out / f"{stem}.csv", index=False)
    return [str(out / f"{stem}.parquet"), str(out / f"{stem}.csv")]


def finish_run(out: Path, summary: dict, model=None) -> dict:
    """Add model identity and version, then write ``summary.json`` (atomically, last)."""
    summary = dict(summary)
    if model is not None and hasattr(model, "replab_identity"):
        summary["model"] = model.replab_identity.to_dict()
    summary["replab_version"] = __version__
    write_json_atomic(out / "summary.json", summary)
    return summary
