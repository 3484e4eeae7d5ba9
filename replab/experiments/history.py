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


def _read_config(run: Path) -> dict | None:
    """A run directory's ``config.yaml`` if it is an experiment's (``experiment`` and ``options``)."""
    try:
        data = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (yaml.YAMLError, OSError):
        return None
    return data if isinstance(data, dict) and "experiment" in data and "options" in data else None


def _describe(run: Path, config: dict) -> tuple[dict, dict | None]:
    """``(row, summary)``: the run's row of :func:`list_runs` and its ``summary.json`` (None while
    it has none)."""
    summary_file = run / "summary.json"
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except ValueError:
            summary = {}
        return {"run": str(run), "experiment": summary.get("experiment", config.get("experiment")),
                "model": (summary.get("model") or {}).get("name"), "profile": config.get("profile"),
                "date": (summary.get("provenance") or {}).get("started"),
                "status": summary.get("status", "complete"),
                "headline": _headline_text(summary.get("headline"))}, summary
    mtime = datetime.fromtimestamp((run / "config.yaml").stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return {"run": str(run), "experiment": config.get("experiment"), "model": config.get("model") or "(default)",
            "profile": config.get("profile"), "date": mtime,
            "status": "running" if dir_locked(run) else "incomplete", "headline": None}, None


def list_runs(root="runs") -> pd.DataFrame:
    """Every experiment run under ``root`` (a directory with an experiment ``config.yaml``):
    ``run, experiment, model, profile, date, status`` (complete / running / incomplete) and the
    first headline number; newest first."""
    root = Path(root)
    if not root.is_dir():
        raise ReplabError(f"{root}: no such directory")
    rows = []
    for path in sorted(root.rglob("config.yaml")):
        config = _read_config(path.parent)
        if config is not None:
            rows.append(_describe(path.parent, config)[0])
    df = pd.DataFrame(rows, columns=_COLUMNS)
    return df.sort_values("date", ascending=False, na_position="last").reset_index(drop=True)


def show_run(run) -> dict:
    """One run: ``{"run", "experiment", "status", "headline", "stages", "report", "config"}``
    (``stages``: name, seconds, reused; ``report``: the path of ``report.html``)."""
    run = Path(run)
    config = _read_config(run)
    if config is None:
        raise ReplabError(f"{run} is not an experiment run directory (no experiment config.yaml)")
    row, summary = _describe(run, config)
    out = {"run": str(run), "experiment": row["experiment"], "status": row["status"], "model": row["model"],
           "config": config}
    if row["status"] == "complete" and (summary or {}).get("provenance"):
        out.update(headline=summary.get("headline", {}), stages=summary["provenance"]["stages"],
                   report=str(run / summary.get("report", "report.html")), seconds=summary["provenance"]["seconds"])
    else:
        done = [p.parent.name for p in sorted(run.glob("*/stage.json"))]
        out.update(headline={}, stages=[{"stage": s, "seconds": None, "reused": None} for s in done], report=None)
    return out
