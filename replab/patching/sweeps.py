"""Activation-patching sweeps: one site, every layer × position / head, one tidy table.

>>> res = sweep(model, task, site="resid_pre", by="layer,position")     # doctest: +SKIP
>>> res.table[["layer", "position", "token", "normalized_effect", "ci_low", "ci_high"]]

``direction="denoise"`` patches clean activations into the corrupt run (sufficiency);
``"noise"`` patches corrupt activations into the clean run (necessity). ``source`` swaps the
patched-in values for an ablation (``zero``, ``mean``, ``resample``, ``noise``) applied to
the base run. ``normalized_effect`` is always (patched − corrupt) / (clean − corrupt) on
prompt means: 1 = clean behaviour, 0 = corrupt behaviour. Its 95% CI resamples prompts, or
the people each pair names when the task says (the super-class task; see
:mod:`replab.patching.bootstrap`).

A sweep is a list of labelled variants (one per cell) handed to the one experiment loop,
:func:`replab.patching.plan.run_plan`, which runs the engine checks of
:mod:`replab.patching.checks` in the same batch (plus the identity check for the swept site)
and stops with a ReplabError if one fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from replab.errors import ReplabError
from replab.hooks import canonical_site, parse_layers, query_heads_of, site_kind
from replab.patching.engine import Variant
from replab.patching.interventions import Intervention
from replab.patching.metrics import check_metric
from replab.patching.plan import run_plan
from replab.patching.task import PatchTask

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

BY = {"layer": ("layer",), "layer,position": ("layer", "position"), "layer,head": ("layer", "head"),
      "layer,head,position": ("layer", "head", "position")}
BY_SYNONYMS = {"layer,pos": "layer,position", "layer,position,head": "layer,head,position",
               "layer,pos,head": "layer,head,position", "layer,head,pos": "layer,head,position"}


@dataclass
class SweepResult:
    """A sweep's tables and summary. ``table``: one row per cell; ``per_prompt``: one row per
    cell × prompt with every candidate's logit; ``summary``: config, baselines, checks."""

    table: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: dict = field(default_factory=dict)

    def save(self, out, model: HookedTransformer | None = None) -> dict:
        """Write the run directory: ``sweep`` and ``per_prompt`` tables, the heatmap, then
        ``summary.json`` (with the model identity)."""
        from replab.patching.plots import save_figure, sweep_heatmap
        from replab.rundir import finish_run, start_run, write_table

        out = start_run(out)
        files = write_table(self.table, out, "sweep") + write_table(self.per_prompt, out, "per_prompt")
        s = self.summary
        title = f"{s['direction']} patching of {s['site']} ({s['metric']}), task {s['task']['name']}"
        files += save_figure(sweep_heatmap(self.table, title), out / "heatmap")
        return finish_run(out, {**s, "kind": "patch_sweep", "files": files}, model)


def parse_by(by: str, site: str) -> tuple[str, ...]:
    key = BY_SYNONYMS.get(by.replace(" ", ""), by.replace(" ", ""))
    if key not in BY:
        raise ReplabError(f"unknown --by {by!r} (known: {', '.join(BY)})")
    axes = BY[key]
    kind = site_kind(site)
    if kind != "vector" and "head" not in axes:
        raise ReplabError(f"site {site} is per head: use --by layer,head or layer,head,position")
    if kind == "vector" and "head" in axes:
        raise ReplabError(f"site {site} has no heads: use --by layer or layer,position")
    return axes


def _cells(model: HookedTransformer, task: PatchTask, site: str, axes, layers, heads, positions):
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    n_heads = n_kv if site_kind(site) == "kv_head" else cfg.n_heads
    head_list = list(range(n_heads)) if heads is None else list(heads)
    pos_list = list(range(task.n_tokens)) if positions is None else list(positions)
    for h in head_list:
        if not 0 <= h < n_heads:
            raise ReplabError(f"head {h} is out of range: {site} has {n_heads} heads")
    for p in pos_list:
        if not 0 <= p < task.n_tokens:
            raise ReplabError(f"position {p} is out of range 0-{task.n_tokens - 1}")
    cells = []
    for layer in layers:
        for h in (head_list if "head" in axes else [None]):
            for p in (pos_list if "position" in axes else [None]):
                cells.append((layer, h, p))
    return cells


def sweep(model: HookedTransformer, task: PatchTask, site: str = "resid_pre", by: str = "layer,position",
          direction: str = "denoise", metric: str = "logit_diff", layers="all", heads=None,
          positions=None, source: str | None = None, scale: float | None = None,
          n_boot: int = 1000, seed: int = 0, checks: bool = True, progress: bool = False,
          max_tokens: int = 65536, engine="local") -> SweepResult:
    """Patch ``site`` at every cell of ``by`` and measure ``metric``; see the module docstring.

    Args:
        site: an alias (``resid_pre``, ``attn_out``, ``mlp_out``, ``z``, ``v``, ``pattern`` ...)
            or its ``head_*`` synonym; k/v sites are indexed by KV head (GQA).
        by: ``layer``, ``layer,position``, ``layer,head`` or ``layer,head,position``.
        direction: ``denoise`` (clean → corrupt run) or ``noise`` (corrupt → clean run).
        layers / heads / positions: restrict the cells (layer spec string or lists).
        source: override what is patched in (default: the other run); e.g. ``zero``, ``mean``.
        engine: ``"local"``, ``"ray"`` or an engine from
            :func:`replab.patching.executors.make_engine` (cells on Ray actors; same results).
    Returns:
        :class:`SweepResult`.
    """
    site, _ = canonical_site(site)
    check_metric(metric)
    if direction not in ("denoise", "noise"):
        raise ReplabError(f"unknown direction {direction!r} (denoise or noise)")
    base = "corrupt" if direction == "denoise" else "clean"
    src = source or ("clean" if direction == "denoise" else "corrupt")
    axes = parse_by(by, site)
    layer_list = parse_layers(layers, model.cfg.n_layers)
    variants = [_cell_variant(model, task, site, layer, h, p, src, scale, seed)
                for layer, h, p in _cells(model, task, site, axes, layer_list, heads, positions)]
    res = run_plan(model, task, variants, metric, base=base, checks=checks,
                   identity=(site, layer_list[0]) if checks else None, n_boot=n_boot, seed=seed,
                   max_tokens=max_tokens, progress=progress, label=f"patch {site}", unit="patch", engine=engine)
    d = res.describe()
    summary = {"site": site, "by": ",".join(axes), "direction": direction, "base": base,
               "source": src, "metric": metric, "task": task.describe(),
               "clean_metric": d["clean_metric"], "corrupt_metric": d["corrupt_metric"],
               "base_metric": d["base_metric"], "n_cells": len(variants), "seconds": d["seconds"]}
    if checks:
        summary["checks"] = d["checks"]
    summary["bootstrap"] = d["bootstrap"]
    table = res.table()[TABLE_COLUMNS]
    per_prompt = res.per_prompt()[["layer", "head", "position", "prompt_id", "metric_after", "candidate_ids",
                                   "candidate_logits"]]
    return SweepResult(table, per_prompt, summary)


TABLE_COLUMNS = ["site", "layer", "component", "head", "query_heads", "position", "token", "metric",
                 "metric_before", "metric_after", "normalized_effect", "ci_low", "ci_high", "answer_logit",
                 "foil_logit", "max_other_logit", "candidate_logits"]


def _cell_variant(model: HookedTransformer, task: PatchTask, site: str, layer: int, h, p, src: str, scale,
                  seed: int) -> Variant:
    """One sweep cell as a labelled variant."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv = site_kind(site) == "kv_head"
    component = f"L{layer}" + ("" if h is None else f"{'KV' if kv else 'H'}{h}")
    info = {"site": site, "layer": layer, "component": component, "head": h,
            "query_heads": ",".join(map(str, query_heads_of(h, cfg.n_heads, n_kv))) if kv and h is not None else None,
            "position": p, "token": _token_label(task, p)}
    iv = Intervention(site, layer, head=h, positions=None if p is None else (p,), source=src, scale=scale, seed=seed)
    return Variant((iv,), name=component if p is None else f"{component}@{p}", group="cell", info=info)


def _token_label(task: PatchTask, p) -> str:
    if p is None:
        return "all"
    return f"{p}:{task.str_tokens[p]}" if task.str_tokens else str(p)
