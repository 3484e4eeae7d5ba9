"""Replay a circuit run from its ``config.yaml`` (:mod:`replab.circuits.runs`): one command,
``replab circuit replay DIR/config.yaml``, repeats the run with the same model, task, options
and seeds."""

from __future__ import annotations

from pathlib import Path

from replab.circuits import blocks_run, edge_runs, path_run, prune_run, report_files, validate_run  # noqa: F401 (register runners)
from replab.circuits.runs import RUNNERS, read_config
from replab.errors import ReplabError


def replay_run(path, out=None, progress: bool = True) -> dict:
    """Repeat the run ``path`` (a run directory or its ``config.yaml``) with the same options,
    writing to ``out`` (default: the same directory). Returns the new summary."""
    config = read_config(path)
    kind = config["kind"]
    if kind not in RUNNERS:
        raise ReplabError(f"cannot replay a {kind!r} run (known: {', '.join(sorted(RUNNERS))})")
    if kind in ("edges", "discover"):            # runs from before the --rule option used the Riemann sum
        config["options"].setdefault("rule", "riemann")
    target = Path(out) if out is not None else (Path(path) if Path(path).is_dir() else Path(path).parent)
    return RUNNERS[kind](**config["options"], out=target, progress=progress)
