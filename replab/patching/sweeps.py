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

Every sweep runs the sanity checks of :mod:`replab.patching.sanity` in the same batch and
stops with a ReplabError if one fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from replab.errors import ReplabError
from replab.hooks import canonical_site, parse_layers, query_heads_of
from replab.patching.bootstrap import describe_groups, task_groups
from replab.patching.engine import Variant, run_variants
from replab.patching.interventions import Intervention
from replab.patching.metrics import bootstrap_ci, check_metric, normalized, task_metrics
from replab.patching.task import PatchTask

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

    def save(self, out, model=None) -> dict:
        """Write the run directory (see :func:`replab.patching.report.save_sweep`)."""
        from replab.patching.report import save_sweep

        return save_sweep(self, out, model)


def parse_by(by: str, site: str) -> tuple[str, ...]:
    key = BY_SYNONYMS.get(by.replace(" ", ""), by.replace(" ", ""))
    if key not in BY:
        raise ReplabError(f"unknown --by {by!r} (known: {', '.join(BY)})")
    axes = BY[key]
    from replab.hooks import SITES

    kind = SITES[site].kind
    if kind != "vector" and "head" not in axes:
        raise ReplabError(f"site {site} is per head: use --by layer,head or layer,head,position")
    if kind == "vector" and "head" in axes:
        raise ReplabError(f"site {site} has no heads: use --by layer or layer,position")
    return axes


def _cells(model, task: PatchTask, site: str, axes, layers, heads, positions):
    from replab.hooks import SITES

    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    n_heads = n_kv if SITES[site].kind == "kv_head" else cfg.n_heads
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


def sweep(model, task: PatchTask, site: str = "resid_pre", by: str = "layer,position",
          direction: str = "denoise", metric: str = "logit_diff", layers="all", heads=None,
          positions=None, source: str | None = None, scale: float | None = None,
          n_boot: int = 1000, seed: int = 0, checks: bool = True, progress: bool = False,
          max_tokens: int = 65536) -> SweepResult:
    """Patch ``site`` at every cell of ``by`` and measure ``metric``; see the module docstring.

    Args:
        site: an alias (``resid_pre``, ``attn_out``, ``mlp_out``, ``z``, ``v``, ``pattern`` ...)
            or its ``head_*`` synonym; k/v sites are indexed by KV head (GQA).
        by: ``layer``, ``layer,position``, ``layer,head`` or ``layer,head,position``.
        direction: ``denoise`` (clean → corrupt run) or ``noise`` (corrupt → clean run).
        layers / heads / positions: restrict the cells (layer spec string or lists).
        source: override what is patched in (default: the other run); e.g. ``zero``, ``mean``.
    Returns:
        :class:`SweepResult`.
    """
    from replab._progress import progress_bar
    from replab.patching import sanity

    site, _ = canonical_site(site)
    check_metric(metric)
    if direction not in ("denoise", "noise"):
        raise ReplabError(f"unknown direction {direction!r} (denoise or noise)")
    base = "corrupt" if direction == "denoise" else "clean"
    src = source or ("clean" if direction == "denoise" else "corrupt")
    axes = parse_by(by, site)
    layer_list = parse_layers(layers, model.cfg.n_layers)
    cells = _cells(model, task, site, axes, layer_list, heads, positions)
    variants = [Variant((Intervention(site, layer, head=h, positions=None if p is None else (p,),
                                      source=src, scale=scale, seed=seed),)) for layer, h, p in cells]
    extra = sanity.variants_for(layer_list[0], base) if checks else []
    t0 = time.time()
    runs = sanity.runs_for(model, task, variants + extra, base, site, layer_list[0]) if checks else None
    with progress_bar(len(variants) + len(extra), f"patch {site}", "patch", enabled=progress) as bar:
        finals, runs = run_variants(model, task.clean, task.corrupt, variants + extra, base=base,
                                    runs=runs, max_tokens=max_tokens, progress=bar.advance)
    elapsed = time.time() - t0
    values, cand = _metric_rows(model, task, metric, finals, runs)
    clean_m, corrupt_m = values["clean"], values["corrupt"]
    patched = values["patched"]
    n_cells = len(cells)
    effect = normalized(patched[:n_cells].mean(1), float(clean_m.mean()), float(corrupt_m.mean()))
    summary = {"site": site, "by": ",".join(axes), "direction": direction, "base": base,
               "source": src, "metric": metric, "task": task.describe(),
               "clean_metric": float(clean_m.mean()), "corrupt_metric": float(corrupt_m.mean()),
               "base_metric": float(values[base].mean()), "n_cells": n_cells,
               "seconds": round(elapsed, 3)}
    if checks:
        summary["checks"] = sanity.evaluate(model, task, site, layer_list[0], base, metric,
                                            patched[n_cells:], values, runs)
    groups = task_groups(task)
    summary["bootstrap"] = describe_groups(groups, task.n_prompts)
    low, high = bootstrap_ci(patched[:n_cells], clean_m, corrupt_m, n_boot=n_boot, seed=seed,
                             groups=groups)
    table = _table(model, task, site, cells, patched[:n_cells], cand[:n_cells], effect, low, high,
                   float(values[base].mean()), metric)
    return SweepResult(table, _per_prompt(task, cells, patched[:n_cells], cand[:n_cells]), summary)


def _metric_rows(model, task: PatchTask, metric: str, finals: torch.Tensor, runs: dict):
    """Per-prompt metrics ``{clean, corrupt, patched [V, N]}`` and candidate logits ``[V, N, C]``."""
    return task_metrics(model, task, metric, finals, runs)


def _token_label(task: PatchTask, p) -> str:
    if p is None:
        return "all"
    return f"{p}:{task.str_tokens[p]}" if task.str_tokens else str(p)


def _table(model, task, site, cells, patched, cand, effect, low, high, base_metric, metric):
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    from replab.hooks import SITES

    kv = SITES[site].kind == "kv_head"
    cand_means = cand.mean(1).tolist()      # [cells, C]: every candidate slot's prompt-mean logit
    rows = []
    for i, (layer, h, p) in enumerate(cells):
        rows.append({
            "site": site, "layer": layer, "component": f"L{layer}" + ("" if h is None else f"{'KV' if kv else 'H'}{h}"),
            "head": h, "query_heads": ",".join(map(str, query_heads_of(h, cfg.n_heads, n_kv))) if kv and h is not None else None,
            "position": p, "token": _token_label(task, p), "metric": metric,
            "metric_before": base_metric, "metric_after": float(patched[i].mean()),
            "normalized_effect": float(effect[i]), "ci_low": float(low[i]), "ci_high": float(high[i]),
            "answer_logit": float(cand[i, :, 0].mean()), "foil_logit": float(cand[i, :, 1].mean()),
            "max_other_logit": float(cand[i, :, 1:].max(-1).mean()),
            "candidate_logits": cand_means[i],
        })
    return pd.DataFrame(rows)


def _per_prompt(task: PatchTask, cells, patched, cand) -> pd.DataFrame:
    """One row per cell × prompt: the metric and every candidate's id and logit."""
    n = task.n_prompts
    layer, head, pos = ([c[k] for c in cells for _ in range(n)] for k in range(3))
    ids = task.candidates.tolist()
    return pd.DataFrame({"layer": layer, "head": head, "position": pos,
                         "prompt_id": np.tile(np.arange(n), len(cells)),
                         "metric_after": patched.reshape(-1).astype(float),
                         "candidate_ids": ids * len(cells),
                         "candidate_logits": list(cand.reshape(len(cells) * n, -1).tolist())})
