"""What the stages of ``replab run superset`` share (:mod:`replab.experiments.superset`): the
task options, paths of earlier stages' files, the CLI flags of each stage's command line."""

from __future__ import annotations

import functools
import shlex
from pathlib import Path

from replab.experiments.spec import rel
from replab.threads import limit_threads


def model_flag(ctx) -> str:
    """`` --model NAME`` for a command line (empty for the default model)."""
    return f" --model {shlex.quote(ctx.model_name)}" if ctx.model_name else ""


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


def png_figures(ctx, files) -> list[str]:
    """The PNGs among a run's ``files``, relative to the experiment's run directory."""
    return [rel(f, ctx.run_dir) for f in files if str(f).endswith(".png")]


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
