"""What the stages of ``replab run superset`` share (:mod:`replab.experiments.superset`): the
task options, paths of earlier stages' files, the CLI flags of each stage's command line."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

from replab.threads import limit_threads


def stage_file(ctx, stage: str, key: str) -> Path:
    """An earlier stage's file (stored relative to the run directory), absolute."""
    return (ctx.run_dir / ctx.results[stage][key]).resolve()


def task_options(ctx) -> dict:
    """The super-class task of every patching stage: the known items, ``classes``, ``pairs``
    (the fields of :class:`replab.features.config.TaskOptions`)."""
    c = ctx.config
    return {"task": "superclass", "classes": c["classes"], "pairs": c["pairs"],
            "dataset": str(stage_file(ctx, "known_items", "dataset"))}


def task_flags(ctx, limit: str = "--pairs") -> str:
    """The task as command-line flags (``limit``: ``--pairs`` for ``features``/``sae``,
    ``--limit`` for ``circuit`` commands)."""
    t = task_options(ctx)
    return (f"--task superclass --classes {t['classes']} {limit} {t['pairs']} "
            f"--dataset {shlex.quote(t['dataset'])}")


def candidate_layer(ctx) -> int:
    """The layer the later stages study (the scan's choice, or the ``layer`` option)."""
    return int(ctx.results["scan"]["layer"])


def limited(fn):
    """``fn`` run with the ``threads`` option's torch and BLAS threads."""
    @functools.wraps(fn)
    def run(ctx):
        n = ctx.config["threads"]
        with limit_threads(n, blas=n):
            return fn(ctx)
    return run


def clean_class(c: dict) -> str:
    """The clean super-class (the first of ``classes``): the class whose direction is studied."""
    return c["classes"].split(",")[0].strip()
