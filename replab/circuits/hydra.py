"""Backup ("hydra") heads (W3 step 3; McGrath et al. 2023, "The Hydra Effect").

>>> res = find_backups(model, task, parse_components("L23H3", model))      # doctest: +SKIP
>>> res.verdict                                                      # doctest: +SKIP
'widen the set: L23H5 compensates +0.21 (38% of the lost direct effect)'

Ablate the critical set in the clean run (one engine variant that also records every
layer's ``hook_z``), then compute every head's **direct effect** on
``logit(answer) − logit(foil)`` in the clean run and in the ablated run: its output through
``W_O`` and the final norm with that run's scale frozen
(:func:`replab.patching.logit_attribution.head_direct_effects`, the per-head view of DLA).
A head *compensates* when its direct effect rises after the ablation. The **lost effect** is
the critical set's own direct effect in the clean run minus in the ablated run (heads via
``hook_z``, MLPs and attention layers via their outputs). Every head outside the set is
ranked by its compensation, with the clean value beside it and a bootstrap CI over prompts.

Verdict: "widen the set: <head> compensates +x (y% of the lost effect)" when some head
compensates at least ``min_fraction`` of the lost effect, else "no backup: no head
compensates more than x"; when the set's own direct effect does not fall (it acts through
later components), "no direct effect lost: ..." with the metric change and the largest rise
(``fraction_of_lost`` is then NaN: there is nothing to take a fraction of), or "little direct
effect lost: ..." when it falls by less than 2% of the clean logit difference (fractions of
so small a loss mean nothing; no backup is named). The DLA is on
the answer − foil logit difference whatever ``metric`` is; ``metric`` itself is reported for the clean and ablated runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from replab.circuits.ablation import Ablation
from replab.circuits.components import Component, check_components, interventions, names
from replab.errors import ReplabError
from replab.patching.bootstrap import mean_ci
from replab.patching.engine import Variant
from replab.patching.logit_attribution import head_direct_effects, vector_direct_effect
from replab.patching.plan import plan_forwards, run_plan

NEGLIGIBLE = 0.02    # a lost direct effect under 2% of the clean logit difference is "little"


def _pct(x: float) -> str:
    text = f"{x:.0%}"
    return "0%" if text == "-0%" else text


def backup_verdict(others: pd.DataFrame, lost: float, min_fraction: float, metric: str, clean: float,
                   ablated: float, scale: float | None = None) -> tuple[str, pd.DataFrame]:
    """``(verdict, backups)`` from the heads outside the set sorted by ``compensation``
    (columns ``head, compensation, fraction_of_lost, ci_low``) and the set's lost direct effect
    (module docstring). ``scale``: the clean run's answer − foil logit difference; a loss under
    :data:`NEGLIGIBLE` of it is too small for fractions of it to mean anything. ``backups``: the
    heads compensating at least ``min_fraction`` of it with a CI above 0 (none when nothing,
    or little, was lost)."""
    top = others.iloc[0]
    if lost > 1e-9 and scale is not None and lost < NEGLIGIBLE * abs(scale):
        return (f"little direct effect lost: the set's own direct effect falls by only {lost:+.3f} "
                f"({_pct(lost / abs(scale))} of the clean logit difference {scale:.3f}) while {metric} goes "
                f"{clean:.3f} -> {ablated:.3f}; largest rise of another head: {top['head']} "
                f"{top['compensation']:+.3f}"), others.iloc[:0]
    if lost <= 1e-9:
        # a set whose own direct effect does not fall acts through later components: there is no
        # lost direct effect for another head to make up, so no percentage of it is meaningful
        return (f"no direct effect lost: the set's own direct effect changes by {-lost:+.3f} while {metric} goes "
                f"{clean:.3f} -> {ablated:.3f} (it acts through later components); largest rise of another "
                f"head: {top['head']} {top['compensation']:+.3f}"), others.iloc[:0]
    backups = others[(others["fraction_of_lost"] >= min_fraction) & (others["ci_low"] > 0)]
    if len(backups):
        b = backups.iloc[0]
        extra = f"; also {', '.join(backups['head'].iloc[1:4])}" if len(backups) > 1 else ""
        return (f"widen the set: {b['head']} compensates {b['compensation']:+.3f} ({_pct(b['fraction_of_lost'])} of "
                f"the lost direct effect {lost:+.2f}){extra}"), backups
    return (f"no backup: no head compensates more than {top['compensation']:+.3f} "
            f"({_pct(top['fraction_of_lost'])} of the lost direct effect {lost:+.2f}, {top['head']})"), backups


@dataclass
class HydraResult:
    """``table``: one row per head (``head, layer, head_index, in_set, dla_clean, dla_ablated,
    compensation, ci_low, ci_high, fraction_of_lost``); ``verdict``; ``summary``."""

    table: pd.DataFrame
    verdict: str
    summary: dict = field(default_factory=dict)


def find_backups(model, task, ablate: list[Component], ablation: Ablation | None = None, metric: str = "logit_diff",
          min_fraction: float = 0.1, n_boot: int = 1000, seed: int = 0, progress: bool = False) -> HydraResult:
    """Ablate ``ablate`` and rank every other head by how much its direct effect rises (module
    docstring)."""
    ablation = ablation or Ablation("mean")
    check_components(ablate, model, task.n_tokens)
    for c in ablate:
        if c.kind not in ("head", "mlp", "attn"):
            raise ReplabError(f"{c.name}: hydra ablates heads, MLPs and attention layers")
    L = model.cfg.n_layers
    z_hooks = tuple(f"blocks.{layer}.attn.hook_z" for layer in range(L))
    vec_hooks = tuple(f"blocks.{c.layer}.hook_{c.kind}_out" for c in ablate if c.kind in ("mlp", "attn"))
    v = Variant(interventions(ablate, model, ablation.source, task.n_tokens, ablation.seed), name="ablated",
                record=z_hooks + vec_hooks)
    forwards = plan_forwards(model, task, [v], base="clean", hooks=z_hooks + vec_hooks)
    sources = ablation.sources(model, task, [iv.hook for iv in v.interventions])
    res = run_plan(model, task, [v], metric, base="clean", sources=sources, forwards=forwards, n_boot=n_boot,
                   seed=seed, progress=progress, label="hydra", unit="run")
    rec = res.recorded[0]
    clean_final, abl_final = forwards["clean"].final, res.finals[0]
    z_clean = torch.stack([forwards["clean"][h][:, -1] for h in z_hooks], 1)
    z_abl = torch.stack([rec[h][:, -1] for h in z_hooks], 1)
    d_clean = head_direct_effects(model, z_clean, clean_final, task).numpy().astype(np.float64)   # [N, L, H]
    d_abl = head_direct_effects(model, z_abl, abl_final, task).numpy().astype(np.float64)
    in_set = {(c.layer, c.head) for c in ablate if c.kind == "head"}
    in_set |= {(c.layer, h) for c in ablate if c.kind == "attn" for h in range(model.cfg.n_heads)}
    lost = np.zeros(task.n_prompts)
    for (layer, h) in {(c.layer, c.head) for c in ablate if c.kind == "head"}:
        lost += d_clean[:, layer, h] - d_abl[:, layer, h]
    for c in ablate:
        if c.kind in ("mlp", "attn"):
            hook = f"blocks.{c.layer}.hook_{c.kind}_out"
            lost += (vector_direct_effect(model, forwards["clean"][hook][:, -1], clean_final, task)
                     - vector_direct_effect(model, rec[hook][:, -1], abl_final, task)).numpy()
    lost_mean = float(lost.mean())
    rows = []
    comp = d_abl - d_clean
    for layer in range(L):
        for h in range(model.cfg.n_heads):
            lo, hi = mean_ci(res.weights, comp[:, layer, h])
            c = float(comp[:, layer, h].mean())
            rows.append({"head": f"L{layer}H{h}", "layer": layer, "head_index": h,
                         "in_set": (layer, h) in in_set, "dla_clean": float(d_clean[:, layer, h].mean()),
                         "dla_ablated": float(d_abl[:, layer, h].mean()), "compensation": c, "ci_low": lo,
                         "ci_high": hi,
                         "fraction_of_lost": c / lost_mean if lost_mean > 1e-9 else float("nan")})
    table = pd.DataFrame(rows)
    others = table[~table["in_set"]].sort_values("compensation", ascending=False).reset_index(drop=True)
    ablated_metric = float(res.patched[0].mean())
    # the clean answer − foil logit difference (the whole final residual's direct effect)
    scale = float(vector_direct_effect(model, clean_final, clean_final, task).mean())
    verdict, backups = backup_verdict(others, lost_mean, min_fraction, metric, res.clean_metric, ablated_metric,
                                      scale)
    summary = {"ablate": names(ablate), "ablation": ablation.describe(), "metric": metric,
               "clean_logit_diff": scale,
               "clean_metric": res.clean_metric, "ablated_metric": ablated_metric,
               "corrupt_metric": res.corrupt_metric, "normalized_effect": float(res.effect[0]),
               "ci_low": float(res.ci_low[0]), "ci_high": float(res.ci_high[0]),
               "lost_direct_effect": lost_mean, "min_fraction": min_fraction,
               "backups": backups[["head", "compensation", "fraction_of_lost", "ci_low", "ci_high",
                                   "dla_clean"]].to_dict("records"),
               "top": others.head(10)[["head", "dla_clean", "dla_ablated", "compensation", "fraction_of_lost"]]
               .to_dict("records"),
               "dla_direction": "logit(answer) − logit(foil), final-norm scale frozen per run",
               "checks": res.checks_dict(), "bootstrap": res.bootstrap, "verdict": verdict}
    return HydraResult(table, verdict, summary)
