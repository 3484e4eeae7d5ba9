"""What an experiment is: named stages over one resolved config, and the narrative of its report.

An :class:`Experiment` (one per workflow of ``docs/workflows.md``) declares

* ``defaults``: every option with its default (written out in ``config.yaml``), and ``quick``:
  the overrides of the ``--quick`` profile (small prompt sets, few steps; for CI);
* ``stages``: :class:`Stage` objects run in order. A stage calls replab's library (never a
  re-implementation), writes its own run directory ``<run>/<stage name>/`` and returns a small
  JSON-able ``result`` dict (the numbers later stages and the report need, plus the
  ``command`` that reproduces it);
* ``headline(results, config)``: the headline numbers (``summary.json["headline"]``);
* ``narrative(summary)``: the report's :class:`Section` list, computed from ``summary.json``
  alone (every number shown comes from it; :func:`replab.experiments.report.num` marks them).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    """One step of an experiment.

    Attributes:
        name: directory name and key in ``summary.json["stages"]`` (``snake_case``).
        title: one line for the progress display and the report.
        run: ``run(ctx) -> dict`` (:class:`replab.experiments.runner.StageContext`).
        keys: the config options this stage reads (its cache key hashes their values, the
            model identity and the keys of every earlier stage: a changed upstream stage
            recomputes everything after it).
        slow: shown with a note in the progress display (training, whole-model sweeps).
    """

    name: str
    title: str
    run: Callable[..., dict]
    keys: tuple[str, ...] = ()
    slow: bool = False


@dataclass
class Section:
    """One section of the report: a title, paragraphs (HTML-safe strings; numbers through
    :func:`~replab.experiments.report.num`), figures (paths relative to the run directory),
    tables (``(caption, list of row dicts)``) and the command that reproduces it."""

    title: str
    paragraphs: list = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    tables: list[tuple[str, list[dict]]] = field(default_factory=list)
    command: str | None = None


@dataclass(frozen=True)
class Experiment:
    """A workflow as one command (module docstring)."""

    name: str
    workflow: str
    title: str
    description: str
    defaults: dict
    quick: dict
    stages: tuple[Stage, ...]
    headline: Callable[[dict, dict], dict]
    narrative: Callable[[dict], list[Section]]

    def resolve(self, options: dict | None = None, quick: bool = False) -> dict:
        """Every option with a value: defaults, then the quick profile, then ``options``."""
        from replab.errors import ReplabError

        options = dict(options or {})
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ReplabError(f"{self.name}: unknown option(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(self.defaults))})")
        return {**self.defaults, **(self.quick if quick else {}), **options}

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def rel(path, run_dir) -> str:
    """``path`` relative to ``run_dir`` (figures are referenced this way in ``summary.json``)."""
    return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))


def png_figures(ctx, files) -> list[str]:
    """The PNGs among a library run's ``files``, relative to the experiment's run directory."""
    return [rel(f, ctx.run_dir) for f in files if str(f).endswith(".png")]


def model_flag(ctx) -> str:
    """`` --model NAME`` for a stage's command line (empty on the default model)."""
    return f" --model {shlex.quote(str(ctx.model_name))}" if ctx.model_name else ""
