"""Generalisation grid (W3 step 5): a block sweep or a validation repeated over many tasks
or classes, split by class, with negative controls reported separately.

Two ways to split:

* **super-class pairs**: ``superclass_tasks`` builds one task per ordered pair of classes
  (clean class A, corrupt class B; up to ``pairs`` entity pairs each), so five classes give 20
  tasks and hundreds of pairs. Results are pooled per clean class (ratio of prompt means over
  all its pairs). **Controls**: for each pair task, the invented and ambiguous people of the
  super-set (``control`` column) in the same template and token layout replace the clean
  person (the corrupt person stays), with the same candidates. On them the sweep's metric
  change is expressed in units of the real task's clean − corrupt gap:
  necessity ``(ablated − unablated control) / gap``, sufficiency ``(patched from the control
  − corrupt) / gap``. A component is **silent** on controls when that change is at most
  ``silent_fraction`` of its change on real people (and the real change is not negligible).
* **a label column** (e.g. the sequence task's ``seq_type``): one task, per-prompt results
  split post hoc by ``task.meta["labels"][column]``.

Sweeps: ``blocks`` (:mod:`replab.circuits.blocks`), or ``necessity`` / ``sufficiency`` of a
component set (without random baselines: the grid is about where the effect holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from replab.circuits.ablation import Ablation
from replab.circuits.batching import shared_forwards
from replab.circuits.blocks import layer_blocks
from replab.circuits.components import interventions
from replab.circuits.validate import complement
from replab.errors import ReplabError
from replab.patching.engine import Variant
from replab.patching.plan import run_plan
from replab.patching.task import PatchTask

SWEEPS = ("blocks", "necessity", "sufficiency")


@dataclass
class GridResult:
    """``rows`` (per group × variant), ``by_class`` (pooled per class), ``controls``, ``summary``."""

    rows: pd.DataFrame
    by_class: pd.DataFrame
    controls: pd.DataFrame
    summary: dict = field(default_factory=dict)


def sweep_variants(model, task, sweep: str, layers=None, components=None, ablation: Ablation | None = None,
                   positions=None, ablate_mlps: bool = False) -> list[tuple[list[Variant], str]]:
    """``[(variants, base), ...]`` of one sweep on one task (labels: ``name``, ``info.test``)."""
    ablation = ablation or Ablation("zero" if sweep == "blocks" else "mean")
    if sweep == "blocks":
        if not layers:
            raise ReplabError("the blocks sweep needs --layer or --layers")
        nec, suf = [], []
        for layer in layers:
            for c in layer_blocks(model, layer, positions):
                info = {"layer": layer, "block": c.whole().name.removeprefix(f"L{layer}")}
                nec.append(Variant((c.intervention(model, ablation.source, task.n_tokens, ablation.seed),),
                                   name=f"necessity {c.name}", info={**info, "test": "necessity"}))
                suf.append(Variant((c.intervention(model, "clean", task.n_tokens),),
                                   name=f"sufficiency {c.name}", info={**info, "test": "sufficiency"}))
        return [(nec, "clean"), (suf, "corrupt")]
    if sweep not in SWEEPS:
        raise ReplabError(f"unknown sweep {sweep!r} (known: {', '.join(SWEEPS)})")
    if not components:
        raise ReplabError(f"the {sweep} sweep needs --components")
    comps = components if sweep == "necessity" else complement(model, components, task.n_tokens, ablate_mlps)
    v = Variant(interventions(comps, model, ablation.source, task.n_tokens, ablation.seed), name=sweep,
                info={"layer": None, "block": "set", "test": sweep})
    return [([v], "clean")]


def superclass_tasks(tokenizer, classes, pairs: int = 16, template: str | None = None,
                     dataset: str | None = None, prepend_bos: bool = False) -> dict[tuple[str, str], PatchTask]:
    """One super-class task per ordered pair of ``classes`` (pairs without same-layout
    partners are skipped)."""
    from replab.patching.superclass import build_superclass_task

    out = {}
    for a in classes:
        for b in classes:
            if a == b:
                continue
            try:
                out[(a, b)] = build_superclass_task(tokenizer, a, b, templates=[template] if template else None,
                                                    max_pairs=pairs, dataset=dataset or "superset",
                                                    prepend_bos=prepend_bos)
            except ReplabError:
                continue
    if not out:
        raise ReplabError(f"no super-class pair tasks for classes {', '.join(classes)}")
    return out


def control_task(tokenizer, task: PatchTask, dataset: str | None = None, prepend_bos: bool = False) -> PatchTask | None:
    """The task's corrupt prompts paired with control people (invented, ambiguous) in the
    task's template and token layout as clean prompts; None if no control fits."""
    from replab.prompts import load_prompts, span_token_positions, token_ids

    text = task.meta.get("template_text")
    if not text:
        return None
    rows = load_prompts(dataset or "superset", tokenizer, prepend_bos=prepend_bos).rows
    if "control" not in rows.columns:
        return None
    ctrl = rows[rows["control"].fillna("").astype(str) != ""]
    people = list(dict.fromkeys(zip(ctrl["entity"], ctrl["control"], strict=True)))
    start, end = task.meta["positions"]["name_first"], task.meta["positions"]["entity_last"]
    ref = task.corrupt[0].tolist()
    keep = []
    for name, kind in people:
        prompt = text.format(name=name)
        ids = token_ids(tokenizer, prompt, prepend_bos)
        span = span_token_positions(tokenizer, prompt, name, prepend_bos)
        if len(ids) == len(ref) and span[0] == start and span[-1] == end and ids[:start] == ref[:start] \
                and ids[end + 1:] == ref[end + 1:]:
            keep.append((name, kind, ids, prompt))
    if not keep:
        return None
    n = task.n_prompts
    idx = [i % n for i in range(max(n, len(keep)))]
    cl = [keep[j % len(keep)] for j in range(len(idx))]
    meta = {**task.meta, "controls": [c[0] for c in cl], "control_kind": [c[1] for c in cl]}
    meta.pop("person_of", None)
    t = PatchTask(task.name + "/controls", torch.tensor([c[2] for c in cl]), task.corrupt[idx], task.answer[idx],
                  task.foil[idx], task.candidates[idx], [c[3] for c in cl],
                  [task.corrupt_prompts[i] for i in idx] if task.corrupt_prompts else [], task.str_tokens, meta,
                  task.class_a)
    return t


def _run_sweep(model, task, plans, metric, ablation, n_boot, seed):
    forwards = shared_forwards(model, task, plans)
    out = []
    for variants, base in plans:
        hooks = sorted({iv.hook for v in variants for iv in v.interventions})
        res = run_plan(model, task, variants, metric, base=base, sources=ablation.sources(model, task, hooks),
                       forwards=forwards, n_boot=n_boot, seed=seed)
        out.append(res)
    return out


def _pooled(clean, corrupt, patched) -> float:
    c, x = float(np.mean(clean)), float(np.mean(corrupt))
    return (float(np.mean(patched)) - x) / (c - x) if abs(c - x) > 1e-9 else float("nan")


def grid_sweep(model, tasks: dict, sweep: str = "blocks", layers=None, components=None,
               ablation: Ablation | None = None, metric: str = "logit_diff", positions=None,
               ablate_mlps: bool = False, label: str | None = None, controls: dict | None = None,
               silent_fraction: float = 0.25, n_boot: int = 200, seed: int = 0, progress: bool = False) -> GridResult:
    """Run ``sweep`` on every task of ``tasks`` (``{group: PatchTask}``; a group is a class
    pair ``(A, B)`` or any label) and on its ``controls`` (``{group: PatchTask}``), split by
    class (module docstring). ``label``: split one task's prompts by ``meta["labels"][label]``."""
    from replab._progress import progress_bar

    ablation = ablation or Ablation("zero" if sweep == "blocks" else "mean")
    rows, pooled, ctrl_rows = [], {}, []
    with progress_bar(len(tasks), f"grid {sweep}", "task", enabled=progress) as bar:
        for group, task in tasks.items():
            plans = sweep_variants(model, task, sweep, layers, components, ablation, positions, ablate_mlps)
            results = _run_sweep(model, task, plans, metric, ablation, n_boot, seed)
            if label is not None:
                labels = np.asarray(task.meta.get("labels", {}).get(label, []))
                if len(labels) != task.n_prompts:
                    raise ReplabError(f"task {task.name} has no per-prompt label {label!r}")
                splits = {str(v): np.flatnonzero(labels == v) for v in dict.fromkeys(labels)}
            else:
                cls = group[0] if isinstance(group, tuple) else str(group)
                splits = {cls: np.arange(task.n_prompts)}
            real = {}
            for res in results:
                for i, v in enumerate(res.variants):
                    key = (v.info.get("layer"), v.info["block"], v.info["test"])
                    real[key] = float(res.effect[i])
                    for cls, idx in splits.items():
                        p = pooled.setdefault((cls, *key), [[], [], []])
                        p[0].append(res.clean[idx])
                        p[1].append(res.corrupt[idx])
                        p[2].append(res.patched[i, idx])
                        rows.append({"group": _name(group), "class": cls, "layer": key[0], "block": key[1],
                                     "test": key[2], "n_prompts": len(idx),
                                     "metric_before": float((res.clean if res.base == "clean" else res.corrupt)[idx]
                                                            .mean()),
                                     "metric_after": float(res.patched[i, idx].mean()),
                                     "normalized_effect": _pooled(res.clean[idx], res.corrupt[idx],
                                                                  res.patched[i, idx])})
            ctask = (controls or {}).get(group)
            if ctask is not None:
                gap = results[0].clean_metric - results[0].corrupt_metric
                cres = _run_sweep(model, ctask, plans, metric, ablation, n_boot, seed)
                for res in cres:
                    for i, v in enumerate(res.variants):
                        key = (v.info.get("layer"), v.info["block"], v.info["test"])
                        after = res.patched[i]
                        before = res.clean if v.info["test"] != "sufficiency" else res.corrupt
                        delta = float((after.mean() - before.mean()) / gap)
                        real_change = real[key] - 1 if v.info["test"] != "sufficiency" else real[key]
                        kinds = ctask.meta.get("control_kind", [])
                        ctrl_rows.append({"group": _name(group), "class": group[0] if isinstance(group, tuple) else
                                          str(group), "layer": key[0], "block": key[1], "test": key[2],
                                          "n_controls": int(ctask.n_prompts),
                                          "control_kinds": ",".join(sorted(set(kinds))),
                                          "control_change": delta, "real_change": real_change})
            bar.advance(1)
    by_class = pd.DataFrame([{"class": k[0], "layer": k[1], "block": k[2], "test": k[3],
                              "n_prompts": int(sum(len(x) for x in v[0])),
                              "normalized_effect": _pooled(np.concatenate(v[0]), np.concatenate(v[1]),
                                                           np.concatenate(v[2]))} for k, v in pooled.items()])
    controls_df = pd.DataFrame(ctrl_rows)
    if len(controls_df):
        controls_df = (controls_df.groupby(["class", "layer", "block", "test"], dropna=False, sort=False)
                       .agg(n_controls=("n_controls", "sum"), control_kinds=("control_kinds", "first"),
                            control_change=("control_change", "mean"), real_change=("real_change", "mean"))
                       .reset_index())
        controls_df["silent"] = [_silent(c, r, silent_fraction) for c, r in
                                 zip(controls_df["control_change"], controls_df["real_change"], strict=True)]
    summary = {"sweep": sweep, "metric": metric, "ablation": ablation.describe(), "groups": [_name(g) for g in tasks],
               "n_tasks": len(tasks), "n_prompts": int(sum(t.n_prompts for t in tasks.values())),
               "classes": sorted({str(c) for c in by_class["class"]}) if len(by_class) else [],
               "silent_fraction": silent_fraction}
    if len(controls_df):
        judged = controls_df[controls_df["silent"] != "n/a"]
        summary["controls_silent"] = (f"{int((judged['silent'] == 'yes').sum())} of {len(judged)} (class, component, "
                                      "test) cells silent on controls")
    return GridResult(pd.DataFrame(rows), by_class, controls_df, summary)


def _silent(control: float, real: float, fraction: float) -> str:
    """``yes`` / ``no``, or ``n/a`` when the component barely acts on real people (|change| < 0.1)."""
    if not np.isfinite(real) or abs(real) < 0.1:
        return "n/a"
    return "yes" if abs(control) <= fraction * abs(real) else "no"


def _name(group) -> str:
    return "→".join(group) if isinstance(group, tuple) else str(group)
