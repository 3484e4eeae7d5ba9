"""Iterative pruning (W4 step 1): remove heads until performance falls below each threshold.

>>> res = prune_heads(model, task, orders=("greedy", "attribution", "random:20"))   # doctest: +SKIP
>>> res.levels[0]        # order, threshold, heads, n_heads, performance, ...   # doctest: +SKIP

**Performance** = the prompt-mean metric of the clean prompts with the removed heads ablated
(default ``mean``: each head's ``hook_z`` replaced by its mean over the clean prompts, per
position) divided by the intact model's; 1 = intact. The metric must be positive on the
intact model (``logit_diff``, ``margin``, ``prob``, ``class_mass``).

Orders (which head goes next):

* ``greedy``: at every step the head whose removal hurts least, measured exactly: one
  batched engine run per step evaluates every remaining candidate (≈ H²/2 variant forwards
  down to the lowest threshold). Each candidate's variant enters at the candidate's own
  layer with the current pruned model's residual stream (an exact ``resid_pre`` patch from a
  recording of the previous step's chosen variant: nothing below that layer changes), so a
  late head costs a few layers, not the whole model. ``candidates=K`` evaluates only the K heads that attribution
  patching (:mod:`replab.circuits.attribution`, recomputed on the current pruned model at
  every step) ranks least harmful; on a seeded subsample of steps it also evaluates every
  candidate and reports how often the exact greedy choice was among the K (``agreement``);
* ``attribution``: by the attribution estimate on the intact model, least harmful first;
* ``reverse``: reverse layer order, last layer first (the backward sweep of Lan & Barez 2023);
* ``forward``: layer order, first layer first;
* ``random:N``: N seeded random orders.

An order-based run evaluates the prefixes of its order (the first k heads removed, for every k)
in batched engine runs of growing size (16, 32, 64, ... prefixes), stopping after the run in
which performance first falls below the lowest threshold (only prefixes up to that crossing
define the levels). For each threshold the level is the circuit just before the first removal
that takes performance below it. Every reported level is then **re-measured**: all distinct
level circuits go through one fresh batched engine run, and ``performance`` is that
measurement (``search_performance`` is the value seen during the search).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from replab.circuits.ablation import Ablation
from replab.circuits.attribution import ablation_attribution
from replab.circuits.components import Component, all_heads, interventions, names
from replab.errors import ReplabError
from replab.patching.engine import Variant
from replab.patching.executors import engine_scope
from replab.patching.interventions import Intervention
from replab.patching.plan import plan_forwards, run_plan

ORDERS = ("greedy", "attribution", "reverse", "forward", "random:N")
PRUNE_METRICS = ("logit_diff", "margin", "prob", "class_mass")


@dataclass
class PruneResult:
    """``levels`` (one record per order × threshold), ``curves`` (performance along each order's
    search), ``survival`` (per head and threshold: the fraction of orders keeping it),
    ``diffs`` (heads shared / different between an order's levels), ``agreement`` (greedy with
    candidates), ``summary``."""

    levels: list[dict]
    curves: pd.DataFrame
    survival: pd.DataFrame
    diffs: pd.DataFrame
    agreement: dict
    summary: dict = field(default_factory=dict)


def parse_orders(spec) -> list[str]:
    """``"greedy,attribution,random:20"`` -> ``["greedy", "attribution", "random0", ..., "random19"]``."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out = []
    for item in [str(s).strip() for s in items if str(s).strip()]:
        if item.startswith("random"):
            n = item.partition(":")[2] or "1"
            try:
                k = int(n)
            except ValueError:
                raise ReplabError(f"bad order {item!r}; use random:N with N a number") from None
            if k < 1:
                raise ReplabError(f"random:{k} needs at least one order")
            out += [f"random{j}" for j in range(k)]
        elif item in ("greedy", "attribution", "reverse", "forward"):
            out.append(item)
        else:
            raise ReplabError(f"unknown order {item!r} (known: {', '.join(ORDERS)})")
    if not out:
        raise ReplabError("no pruning order given")
    return list(dict.fromkeys(out))


def parse_thresholds(spec) -> list[float]:
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    try:
        ths = sorted({float(x) for x in items if str(x).strip()}, reverse=True)
    except ValueError:
        raise ReplabError(f"bad thresholds {spec!r}; use numbers such as 0.97,0.9,0.8,0.7") from None
    if not ths or any(not 0 < t <= 1 for t in ths):
        raise ReplabError(f"thresholds must be in (0, 1], got {spec!r}")
    return ths


class _Evaluator:
    """Exact performance of ablated head sets, in batched engine runs on cached forwards."""

    def __init__(self, model, task, ablation: Ablation, metric: str, n_boot: int, seed: int, engine="local"):
        self.model, self.task, self.ablation, self.metric = model, task, ablation, metric
        self.n_boot, self.seed, self.engine = n_boot, seed, engine
        heads = all_heads(model)
        probe = [Variant(interventions(heads, model, ablation.source, task.n_tokens, ablation.seed))]
        hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
        self.forwards = plan_forwards(model, task, probe, base="clean", hooks=hooks)
        self.sources = ablation.sources(model, task, [f"blocks.{layer}.attn.hook_z"
                                                      for layer in range(model.cfg.n_layers)])
        self.n_variants = 0
        self.n_attribution = 0
        self.n_runs = 0
        self.seconds = 0.0
        first = self.run([[]])
        self.intact = first.clean_metric
        self.clean_metric, self.corrupt_metric = first.clean_metric, first.corrupt_metric
        if not self.intact > 0:
            raise ReplabError(f"performance = ablated / intact {metric} needs a positive intact metric, got "
                              f"{self.intact:.4g} (use a metric the model gets right on the clean prompts)")

    def variant(self, removed: list[Component], name: str = "") -> Variant:
        if not removed:
            return Variant((), start=0, name=name)
        return Variant(interventions(removed, self.model, self.ablation.source, self.task.n_tokens,
                                     self.ablation.seed), name=name)

    def run(self, sets: list[list[Component]], progress: bool = False, label: str = "prune", variants=None,
            sources=None):
        """One batched engine run of ``sets`` ablated (or of ready-made ``variants``)."""
        t0 = time.time()
        variants = variants or [self.variant(s, f"v{i}") for i, s in enumerate(sets)]
        res = run_plan(self.model, self.task, variants, self.metric, base="clean", sources=sources or self.sources,
                       forwards=self.forwards, n_boot=self.n_boot, seed=self.seed, progress=progress, label=label,
                       unit="set", engine=self.engine)
        self.n_variants += len(variants) + res.n_engine_variants
        self.n_runs += 1
        self.seconds += time.time() - t0
        return res

    def performance(self, sets: list[list[Component]], progress: bool = False, label: str = "prune") -> np.ndarray:
        res = self.run(sets, progress, label)
        return res.patched.mean(1) / self.intact

    def clean_resid(self) -> dict[int, torch.Tensor]:
        """The clean run's residual entering every layer (the intact model's state)."""
        return {k: self.forwards["clean"][f"blocks.{k}.hook_resid_pre"] for k in range(self.model.cfg.n_layers)}

    def extend(self, removed: list[Component], resid: dict, candidates: list[Component], record: bool,
               label: str) -> tuple[np.ndarray, list]:
        """Performance of ``removed + [c]`` for each candidate, each variant entering at ``c``'s
        layer with the current pruned run's residual (``resid``, the ``removed`` model's state;
        everything below ``c``'s layer is unchanged by removing ``c``). With ``record`` also
        each candidate's residuals above its layer (the next state). Returns ``(performance,
        recordings)``."""
        L = self.model.cfg.n_layers
        variants = []
        for i, c in enumerate(candidates):
            later = [r for r in removed if r.layer >= c.layer] + [c]
            ivs = (Intervention("resid_pre", c.layer, source="custom:pruned"),
                   *interventions(later, self.model, self.ablation.source, self.task.n_tokens, self.ablation.seed))
            rec = tuple(f"blocks.{k}.hook_resid_pre" for k in range(c.layer + 1, L)) if record else ()
            variants.append(Variant(tuple(sorted(ivs, key=lambda iv: iv.layer)), name=f"c{i}", record=rec))
        sources = {**self.sources, "pruned": {f"blocks.{k}.hook_resid_pre": v for k, v in resid.items()}}
        res = self.run([], False, label, variants=variants, sources=sources)
        recs = [res.recorded.get(i, {}) for i in range(len(candidates))]
        return res.patched.mean(1) / self.intact, recs

    def attribution(self, removed: list[Component], candidates: list[Component], current: float) -> np.ndarray:
        """Estimated performance after removing each candidate on top of ``removed``, whose
        own performance is ``current`` (one forward + backward)."""
        delta = ablation_attribution(self.model, self.task, removed, candidates, self.ablation.source, self.metric,
                                     self.forwards, self.sources, self.ablation.seed)
        self.n_attribution += 1
        return current + delta / self.intact


def _fixed_order(kind: str, model, ev: _Evaluator, seed: int) -> list[Component]:
    heads = all_heads(model)
    if kind == "attribution":
        est = ev.attribution([], heads, 1.0)
        return [heads[i] for i in np.argsort(-est, kind="stable")]
    if kind == "reverse":
        return list(reversed(heads))
    if kind == "forward":
        return heads
    j = int(kind.removeprefix("random"))
    rng = np.random.default_rng([seed, j])
    return [heads[i] for i in rng.permutation(len(heads))]


def _prefix_search(order: list[Component], ev: _Evaluator, floor: float, progress: bool, label: str):
    """Performance of the prefixes of ``order`` (batched runs of 16, 32, 64, ... prefixes),
    up to the first one below ``floor``. Returns ``(removed heads, performances)``."""
    perf: list[float] = []
    k, size = 0, 16
    while k < len(order):
        ks = list(range(k + 1, min(len(order), k + size) + 1))
        perf += ev.performance([order[:j] for j in ks], progress, label).tolist()
        k = ks[-1]
        if min(perf) < floor:
            break
        size *= 2
    return order[:len(perf)], perf


def _greedy(model, ev: _Evaluator, floor: float, candidates: int | None, check_every: int,
            progress: bool) -> tuple[list[Component], list[float], dict]:
    """Greedy removal; each step's candidates enter at their own layer from the current pruned
    run's residuals (:meth:`_Evaluator.extend`), so a late head costs a few layers, not 30."""
    from replab._progress import progress_bar

    remaining = all_heads(model)
    removed: list[Component] = []
    perf: list[float] = []
    checks: list[dict] = []
    resid = ev.clean_resid()
    with progress_bar(len(remaining), "greedy pruning", "step", enabled=progress) as bar:
        while remaining:
            step = len(removed)
            narrowed = candidates is not None and candidates < len(remaining)
            if narrowed:
                est = ev.attribution(removed, remaining, perf[-1] if perf else 1.0)
                pool = [remaining[i] for i in np.argsort(-est, kind="stable")[:candidates]]
            else:
                pool = list(remaining)
            exact, recs = ev.extend(removed, resid, pool, True, f"greedy step {step}")
            best = int(np.argmax(exact))
            if narrowed and check_every > 0 and step % check_every == 0:
                full, _ = ev.extend(removed, resid, remaining, False, f"greedy check {step}")
                top = remaining[int(np.argmax(full))]
                checks.append({"step": step, "n_remaining": len(remaining), "exact_choice": top.name,
                               "k_choice": pool[best].name, "exact_in_k": top in pool,
                               "same_choice": top == pool[best], "exact_best_performance": float(full.max()),
                               "k_best_performance": float(exact[best])})
            chosen = pool[best]
            resid = {k: (recs[best][f"blocks.{k}.hook_resid_pre"] if k > chosen.layer else v)
                     for k, v in resid.items()}
            removed.append(chosen)
            remaining.remove(chosen)
            perf.append(float(exact[best]))
            bar.advance(1)
            if perf[-1] < floor:
                break
    agreement = {}
    if candidates is not None:
        n = len(checks)
        agreement = {"candidates": candidates, "check_every": check_every, "steps_checked": n,
                     "exact_choice_in_k": float(np.mean([c["exact_in_k"] for c in checks])) if n else None,
                     "same_choice": float(np.mean([c["same_choice"] for c in checks])) if n else None,
                     "checks": checks}
    return removed, perf, agreement


def _levels(order_name, removed, perf, thresholds, heads):
    """Per threshold: the circuit just before performance first falls below it."""
    out = []
    for th in thresholds:
        below = next((i for i, p in enumerate(perf) if p < th), None)
        n_removed = len(removed) if below is None else below
        gone = set(removed[:n_removed])
        kept = [h for h in heads if h not in gone]
        search = 1.0 if n_removed == 0 else perf[n_removed - 1]
        out.append({"order": order_name, "threshold": th, "kept": kept, "search_performance": float(search),
                    "crossed": below is not None})
    return out


def prune_heads(model, task, thresholds=(0.97, 0.9, 0.8, 0.7), orders=("greedy", "attribution", "reverse", "random:20"),
          ablation: Ablation | None = None, metric: str = "logit_diff", candidates: int | None = None,
          check_every: int = 10, seed: int = 0, n_boot: int = 200, progress: bool = False,
          engine="local") -> PruneResult:
    """Prune heads along each order down to the lowest threshold (module docstring).

    Args:
        thresholds: performance levels (fractions of the intact metric).
        orders: names of :data:`ORDERS` (``random:N`` expands to N seeded orders).
        candidates: greedy only: evaluate exactly the K heads attribution ranks least harmful.
        check_every: greedy with candidates: every this many steps (and step 0), also evaluate
            every candidate to measure agreement with exact greedy (0: never).
        engine: where the batched engine runs go: ``"local"``, ``"ray"`` or an engine from
            :func:`~replab.patching.executors.make_engine` (its workers load the model once for
            the whole pruning); the results are the local engine's. Attribution passes
            (gradients) run in this process.
    Returns:
        :class:`PruneResult`.
    """
    ablation = ablation or Ablation("mean")
    if metric not in PRUNE_METRICS:
        raise ReplabError(f"pruning divides by the intact metric: use one of {', '.join(PRUNE_METRICS)}, "
                          f"not {metric!r}")
    if candidates is not None and candidates < 1:
        raise ReplabError(f"--candidates must be at least 1, not {candidates}")
    ths = parse_thresholds(thresholds)
    order_names = parse_orders(orders)
    with engine_scope(engine) as runner:
        return _prune(model, task, ths, order_names, ablation, metric, candidates, check_every, seed, n_boot,
                      progress, runner)


def _prune(model, task, ths, order_names, ablation, metric, candidates, check_every, seed, n_boot, progress,
           engine) -> PruneResult:
    heads = all_heads(model)
    floor = min(ths)
    t_start = time.time()
    ev = _Evaluator(model, task, ablation, metric, n_boot, seed, engine)
    curves, levels, timing, agreement = [], [], {}, {}
    for name in order_names:
        t0, c0, v0 = time.time(), time.process_time(), ev.n_variants
        if name == "greedy":
            removed, perf, agreement = _greedy(model, ev, floor, candidates, check_every, progress)
        else:
            order = _fixed_order(name, model, ev, seed)
            removed, perf = _prefix_search(order, ev, floor, progress, f"prune {name}")
        timing[name] = {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(time.process_time() - c0, 2),
                        "variant_forwards": ev.n_variants - v0, "heads_removed": len(removed)}
        curves += [{"order": name, "step": 0, "n_heads": len(heads), "removed": None, "performance": 1.0}]
        curves += [{"order": name, "step": i + 1, "n_heads": len(heads) - i - 1, "removed": h.name, "performance": p}
                   for i, (h, p) in enumerate(zip(removed, perf, strict=True))]
        levels += _levels(name, removed, perf, ths, heads)
    # re-measure every level circuit exactly, fresh, in one batched run
    keys = list(dict.fromkeys(tuple(names(lv["kept"])) for lv in levels))
    kept_sets = {k: [h for h in heads if h.name in set(k)] for k in keys}
    res = ev.run([[h for h in heads if h.name not in set(k)] for k in keys], progress, "re-measure levels")
    kl = res.values("kl")[2].mean(1)
    logits = res.table()[["answer_logit", "foil_logit", "max_other_logit", "candidate_logits"]].to_dict("records")
    at = {k: i for i, k in enumerate(keys)}
    records = []
    for lv in levels:
        i = at[tuple(names(lv["kept"]))]
        records.append({"order": lv["order"], "threshold": lv["threshold"], "heads": names(kept_sets[keys[i]]),
                        "n_heads": len(kept_sets[keys[i]]), "performance": float(res.patched[i].mean() / ev.intact),
                        "search_performance": lv["search_performance"], "crossed": lv["crossed"],
                        "metric_value": float(res.patched[i].mean()), "normalized_effect": float(res.effect[i]),
                        "ci_low": float(res.ci_low[i]), "ci_high": float(res.ci_high[i]), "kl": float(kl[i]),
                        "ablation": ablation.describe(), "metric": metric, **logits[i]})
    curves_df = pd.DataFrame(curves)
    summary = {"thresholds": ths, "orders": order_names, "ablation": ablation.describe(), "metric": metric,
               "intact_metric": ev.intact, "clean_metric": ev.clean_metric, "corrupt_metric": ev.corrupt_metric,
               "n_heads": len(heads), "candidates": candidates, "timing": timing,
               "variant_forwards": ev.n_variants, "engine_runs": ev.n_runs,
               "attribution_passes": getattr(ev, "n_attribution", 0), "prompts": task.n_prompts,
               "tokens": task.n_tokens, "seconds": round(time.time() - t_start, 2),
               "engine_seconds": round(ev.seconds, 2), "checks": res.checks_dict(), "bootstrap": res.bootstrap,
               "engine": engine.describe()}
    return PruneResult(records, curves_df, survival(records, model), level_diffs(records), agreement, summary)


def survival(levels: list[dict], model) -> pd.DataFrame:
    """Per head and threshold: the fraction of orders whose level circuit keeps it."""
    rows = []
    df = pd.DataFrame(levels)
    for th, sub in df.groupby("threshold"):
        n = len(sub)
        counts: dict[str, int] = {}
        for hs in sub["heads"]:
            for h in hs:
                counts[h] = counts.get(h, 0) + 1
        for c in all_heads(model):
            rows.append({"threshold": th, "head": c.name, "layer": c.layer, "head_index": c.head,
                         "survival": counts.get(c.name, 0) / n, "n_orders": n})
    return pd.DataFrame(rows)


def level_diffs(levels: list[dict]) -> pd.DataFrame:
    """Per order and pair of thresholds: heads in both levels and in only one, and Jaccard."""
    rows = []
    df = pd.DataFrame(levels)
    for order, sub in df.groupby("order", sort=False):
        recs = sub.sort_values("threshold", ascending=False).to_dict("records")
        for i, a in enumerate(recs):
            for b in recs[i + 1:]:
                sa, sb = set(a["heads"]), set(b["heads"])
                rows.append({"order": order, "threshold_a": a["threshold"], "threshold_b": b["threshold"],
                             "n_a": len(sa), "n_b": len(sb), "shared": sorted(sa & sb), "only_a": sorted(sa - sb),
                             "only_b": sorted(sb - sa),
                             "jaccard": len(sa & sb) / len(sa | sb) if sa | sb else 1.0})
    return pd.DataFrame(rows)
