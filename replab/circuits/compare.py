"""Compare two circuits (W3 step 5, W4 step 5): e.g. months against weekdays, or sequence
continuation against a greater-than-like task.

A circuit comes from a run directory: a ``circuit prune`` run gives one circuit per (order,
threshold) level; a ``necessity``/``sufficiency``/``minimality`` or ``hydra`` run gives its
component set. :func:`compare_circuits` reports, for each level both runs have (or their
single sets), the heads shared, the heads only in one, and the Jaccard index;
:func:`cross_performance` evaluates each circuit on the other run's task (keep only the
circuit's heads, ablate the rest with that task's ablation and metric) next to its own task,
in one batched engine run per task: performance = metric / intact metric.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from replab.circuits.ablation import Ablation
from replab.circuits.components import all_heads, interventions, parse_components
from replab.circuits.runs import read_config
from replab.errors import ReplabError
from replab.io import inside, read_json
from replab.patching.engine import Variant
from replab.patching.plan import run_plan


def circuits_of(run) -> tuple[dict[str, list[str]], dict]:
    """``({level label: [head names]}, config)`` of a circuit run directory."""
    d = Path(run)
    config = read_config(d)
    summary_file = inside(d, "summary.json", "run summary")
    if not summary_file.is_file():
        raise ReplabError(f"{run} has no summary.json (an unfinished run?)")
    s = read_json(summary_file, "run summary")
    if config["kind"] == "prune":
        try:
            return {f"{lv['order']}@{lv['threshold']:g}": list(lv["heads"]) for lv in s["levels"]}, config
        except (KeyError, TypeError, ValueError):
            raise ReplabError(f"{summary_file}: no readable pruning levels (order, threshold, heads)") from None
    comps = config["options"].get("components") or config["options"].get("ablate")
    if not comps:
        raise ReplabError(f"{run} ({config['kind']}) names no component set")
    return {"set": [c for c in comps]}, config


def compare_circuits(a: dict[str, list[str]], b: dict[str, list[str]]) -> pd.DataFrame:
    """Per common level (or every pair when the runs share none): shared / only-A / only-B heads."""
    common = [k for k in a if k in b]
    pairs = [(k, k) for k in common] or [(ka, kb) for ka in a for kb in b]
    rows = []
    for ka, kb in pairs:
        sa, sb = set(a[ka]), set(b[kb])
        rows.append({"level_a": ka, "level_b": kb, "n_a": len(sa), "n_b": len(sb), "n_shared": len(sa & sb),
                     "shared": sorted(sa & sb), "only_a": sorted(sa - sb), "only_b": sorted(sb - sa),
                     "jaccard": len(sa & sb) / len(sa | sb) if sa | sb else 1.0})
    return pd.DataFrame(rows)


def cross_performance(model, task, circuits: dict[str, list[str]], ablation: Ablation, metric: str,
                      n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Each circuit (head names) kept alone on ``task``: ``circuit, n_heads, metric_value,
    performance`` (metric / intact), ``normalized_effect``."""
    heads = all_heads(model)
    variants, labels = [], list(circuits)
    for label in labels:
        keep = {c.name for c in parse_components(circuits[label], model)} if circuits[label] else set()
        removed = [h for h in heads if h.name not in keep]
        ivs = interventions(removed, model, ablation.source, task.n_tokens, ablation.seed) if removed else ()
        variants.append(Variant(ivs, start=None if ivs else 0, name=label))
    hooks = sorted({iv.hook for v in variants for iv in v.interventions})
    res = run_plan(model, task, variants, metric, base="clean", sources=ablation.sources(model, task, hooks),
                   n_boot=n_boot, seed=seed)
    intact = res.clean_metric
    return pd.DataFrame([{"circuit": label, "n_heads": len(circuits[label]),
                          "metric_value": float(res.patched[i].mean()),
                          "performance": float(res.patched[i].mean() / intact) if intact else float("nan"),
                          "normalized_effect": float(res.effect[i]), "ci_low": float(res.ci_low[i]),
                          "ci_high": float(res.ci_high[i])} for i, label in enumerate(labels)])
