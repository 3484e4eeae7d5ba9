"""Run directories for patching results: tables, figures, then ``summary.json`` last.

A run directory is complete only when ``summary.json`` exists (it is removed first and
written atomically last), so an interrupted run never looks finished.
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


def save_sweep(result, out, model=None) -> dict:
    """Write a :class:`~replab.patching.sweeps.SweepResult`: table, per-prompt table, heatmap."""
    from replab.patching.plots import save_figure, sweep_heatmap

    out = start_run(out)
    files = write_table(result.table, out, "sweep") + write_table(result.per_prompt, out, "per_prompt")
    s = result.summary
    title = (f"{s['direction']} patching of {s['site']} ({s['metric']}), task {s['task']['name']}")
    files += save_figure(sweep_heatmap(result.table, title), out / "heatmap")
    return finish_run(out, {**s, "kind": "patch_sweep", "files": files}, model)
