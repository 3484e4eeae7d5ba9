"""Finding past runs: ``replab runs list`` and ``replab runs show``."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from replab.errors import ReplabError
from replab.io import dir_locked

_COLUMNS = ["run", "experiment", "model", "profile", "date", "status", "headline"]


def _headline_text(headline: dict) -> str | None:
    if not headline:
        return None
    key, value = next(iter(headline.items()))
    return f"{key} = {value:.4g}" if isinstance(value, float) else f"{key} = {value}"


def _describe(run: Path) -> dict:
    summary_file, config_file = run / "summary.json", run / "config.yaml"
    config = {}
    if config_file.is_file():
        try:
            config = yaml.safe_load(config_file.read_text()) or {}
        except yaml.YAMLError:
            config = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except ValueError:
            summary = {}
        return {"run": str(run), "experiment": summary.get("experiment", config.get("experiment")),
                "model": (summary.get("model") or {}).get("name"), "profile": config.get("profile"),
                "date": (summary.get("provenance") or {}).get("started"),
                "status": summary.get("status", "complete"), "headline": _headline_text(summary.get("headline"))}
    mtime = datetime.fromtimestamp(config_file.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return {"run": str(run), "experiment": config.get("experiment"), "model": config.get("model") or "(default)",
            "profile": config.get("profile"), "date": mtime,
            "status": "running" if dir_locked(run) else "incomplete", "headline": None}


def list_runs(root="runs") -> pd.DataFrame:
    """Every experiment run under ``root`` (a directory with an experiment ``config.yaml``):
    ``run, experiment, model, profile, date, status`` (complete / running / incomplete) and the
    first headline number; newest first."""
    root = Path(root)
    if not root.is_dir():
        raise ReplabError(f"{root}: no such directory")
    rows = []
    for config in sorted(root.rglob("config.yaml")):
        try:
            data = yaml.safe_load(config.read_text()) or {}
        except (yaml.YAMLError, OSError):
            continue
        if isinstance(data, dict) and "experiment" in data and "options" in data:
            rows.append(_describe(config.parent))
    df = pd.DataFrame(rows, columns=_COLUMNS)
    return df.sort_values("date", ascending=False, na_position="last").reset_index(drop=True)


def show_run(run) -> dict:
    """One run: ``{"run", "experiment", "status", "headline", "stages", "report", "config"}``
    (``stages``: name, seconds, reused; ``report``: the path of ``report.html``)."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ReplabError(f"{run} is not an experiment run directory (no config.yaml)")
    row = _describe(run)
    out = {"run": str(run), "experiment": row["experiment"], "status": row["status"], "model": row["model"],
           "config": yaml.safe_load((run / "config.yaml").read_text())}
    if row["status"] == "complete":
        summary = json.loads((run / "summary.json").read_text())
        out.update(headline=summary.get("headline", {}), stages=summary["provenance"]["stages"],
                   report=str(run / summary.get("report", "report.html")), seconds=summary["provenance"]["seconds"])
    else:
        done = [p.parent.name for p in sorted(run.glob("*/stage.json"))]
        out.update(headline={}, stages=[{"stage": s, "seconds": None, "reused": None} for s in done], report=None)
    return out
