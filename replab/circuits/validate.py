"""Circuit validation (W3, W5): necessity, sufficiency and minimality of a component set.

>>> comps = parse_components("L23H3,L29H1,L23H0", model)                        # doctest: +SKIP
>>> res = necessity(model, task, comps, Ablation("mean"))                       # doctest: +SKIP
>>> res.records[0]["normalized_effect"], res.records[0]["random_p05"]          # doctest: +SKIP

All three ablate on the **clean** run (base = clean) and measure the task's metric, its KL to
the clean run and the normalised effect ``(metric − corrupt) / (clean − corrupt)`` (1 = the
intact model, 0 = the corrupt run) with a bootstrap CI over prompts (people for the
super-class task). Every run also measures at least 20 random sets of the same size and
layer profile (:mod:`replab.circuits.baselines`) in the same batched engine run, so a reader
sees whether the set is special:

* :func:`necessity`: ablate the set. A necessary set drops the effect below most random
  sets (``percentile`` near 0, effect under ``random_p05``).
* :func:`sufficiency`: keep only the set: ablate every other head (and, with
  ``ablate_mlps``, every other MLP). A sufficient set keeps the effect near 1 and above
  ``random_p95``. A head given with positions is kept there and ablated elsewhere.
* :func:`minimality`: for each member ``v``, the set kept alone with and without ``v``
  (``delta`` = effect with − effect without, with a bootstrap CI), against the drop that
  removing one (seeded) member of each random set causes.

``records`` use the keys ``components, ablation, metric`` (prompt-mean raw metric of the
ablated run), ``clean_metric, corrupt_metric, normalized_effect, kl, ci_low, ci_high,
random_mean, random_p95`` (plus ``random_p05, percentile, n_random, random_kl_mean, verdict``);
``random_*`` are in normalised-effect units (for minimality: of ``delta``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from replab.circuits.ablation import Ablation
from replab.circuits.baselines import MIN_RANDOM, baseline_stats, random_sets
from replab.circuits.components import Component, check_components, interventions, names
from replab.errors import ReplabError
from replab.patching.engine import Variant
from replab.patching.plan import run_plan

KINDS = ("necessity", "sufficiency", "minimality")


@dataclass
class ValidationResult:
    """``records`` (one per tested set; minimality: one per member), ``table`` (one row per
    engine variant, random sets included), ``per_prompt`` and ``summary``."""

    kind: str
    records: list[dict]
    table: pd.DataFrame
    per_prompt: pd.DataFrame
    summary: dict = field(default_factory=dict)
    plan: object = None


def complement(model, comps: list[Component], n_tokens: int, ablate_mlps: bool = False) -> list[Component]:
    """What "keep only ``comps``" ablates: every head not in the set (a head given with
    positions: its other positions), and with ``ablate_mlps`` every MLP not in the set."""
    cfg = model.cfg
    keep_heads: dict[tuple[int, int], set | None] = {}
    keep_mlps: dict[int, set | None] = {}
    for c in comps:
        if c.kind == "head" and c.part is None:
            _merge(keep_heads, (c.layer, c.head), c.abs_positions(n_tokens))
        elif c.kind == "attn":
            for h in range(cfg.n_heads):
                _merge(keep_heads, (c.layer, h), c.abs_positions(n_tokens))
        elif c.kind == "mlp":
            _merge(keep_mlps, c.layer, c.abs_positions(n_tokens))
        else:
            raise ReplabError(f"{c.name}: keeping only a set takes head outputs, ATTN and MLP components "
                              "(not q/k/v inputs, EMBED or RESID)")
    out = []
    every = set(range(n_tokens))
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            out += _rest(Component("head", layer, h), keep_heads.get((layer, h), set()), every)
        if ablate_mlps:
            out += _rest(Component("mlp", layer), keep_mlps.get(layer, set()), every)
    if not out:
        what = "every head and MLP" if ablate_mlps else "every head"
        raise ReplabError(f"the set keeps {what}: keeping only it ablates nothing (the result is the intact model)")
    return out


def _merge(store: dict, key, positions) -> None:
    if key in store and store[key] is None:
        return
    store[key] = None if positions is None else (store.get(key) or set()) | set(positions)


def _rest(c: Component, kept, every: set) -> list[Component]:
    if kept is None:
        return []
    left = sorted(every - kept)
    if not left:
        return []
    return [c if not kept else Component(c.kind, c.layer, c.head, None, tuple(left))]


def _ablate_variant(model, task, comps, ablation: Ablation, name: str, group: str, info: dict) -> Variant:
    return Variant(interventions(comps, model, ablation.source, task.n_tokens, ablation.seed),
                   name=name, group=group, info=info)


def _hooks(variants) -> list[str]:
    return sorted({iv.hook for v in variants for iv in v.interventions})


def _run(model, task, variants, metric, ablation: Ablation, n_boot, seed, forwards, progress, label):
    sources = ablation.sources(model, task, _hooks(variants))
    res = run_plan(model, task, variants, metric, base="clean", sources=sources, forwards=forwards,
                   n_boot=n_boot, seed=seed, progress=progress, label=label, unit="set")
    kl = res.values("kl")[2].mean(1) if metric != "kl" else res.patched.mean(1)
    return res, kl


def _table(res, kl) -> pd.DataFrame:
    t = res.table()
    t.insert(t.columns.get_loc("normalized_effect") + 1, "kl", kl)
    return t


def _verdict(kind: str, eff: float, stats: dict) -> str:
    if not stats["n_random"]:
        return "no random baseline"
    if kind == "necessity":
        special = eff < stats["random_p05"]
        return (f"necessary beyond chance: ablating it leaves {eff:.2f} of the effect, below "
                f"{1 - stats['percentile']:.0%} of {stats['n_random']} random sets "
                f"(mean {stats['random_mean']:.2f})" if special else
                f"not special: ablating it leaves {eff:.2f}, within the random sets' range (p05 "
                f"{stats['random_p05']:.2f}, mean {stats['random_mean']:.2f})")
    special = eff > stats["random_p95"]
    return (f"sufficient beyond chance: alone it keeps {eff:.2f} of the effect, above {stats['percentile']:.0%} of "
            f"{stats['n_random']} random sets (mean {stats['random_mean']:.2f})" if special else
            f"not special: alone it keeps {eff:.2f}, within the random sets' range (p95 {stats['random_p95']:.2f}, "
            f"mean {stats['random_mean']:.2f})")


def _prepare(model, task, comps, n_random: int):
    if n_random < MIN_RANDOM and n_random != 0:
        raise ReplabError(f"use at least {MIN_RANDOM} random sets (or 0 to skip the baseline), not {n_random}")
    check_components(comps, model, task.n_tokens)


def _record(kind, res, kl, row, comps, ablation, stats, **extra) -> dict:
    eff = float(res.effect[row])
    rec = {"kind": kind, "components": names(comps), "ablation": ablation.describe(), "metric_name": res.metric,
           "metric": float(res.patched[row].mean()), "clean_metric": res.clean_metric,
           "corrupt_metric": res.corrupt_metric, "normalized_effect": eff, "kl": float(kl[row]),
           "ci_low": float(res.ci_low[row]), "ci_high": float(res.ci_high[row]), **stats, **extra}
    return rec


def necessity(model, task, comps: list[Component], ablation: Ablation | None = None, metric: str = "logit_diff",
              n_random: int = MIN_RANDOM, seed: int = 0, n_boot: int = 1000, forwards=None,
              progress: bool = False) -> ValidationResult:
    """Ablate ``comps`` in the clean run, next to ``n_random`` random sets (module docstring)."""
    ablation = ablation or Ablation()
    _prepare(model, task, comps, n_random)
    rand = random_sets(model, comps, n_random, seed) if n_random else []
    variants = [_ablate_variant(model, task, comps, ablation, "set", "set", {"random": None})]
    variants += [_ablate_variant(model, task, r, ablation, f"random{j}", "random", {"random": j})
                 for j, r in enumerate(rand)]
    res, kl = _run(model, task, variants, metric, ablation, n_boot, seed, forwards, progress, "necessity")
    stats = baseline_stats(float(res.effect[0]), res.effect[1:])
    stats["random_kl_mean"] = float(np.mean(kl[1:])) if len(rand) else float("nan")
    rec = _record("necessity", res, kl, 0, comps, ablation, stats)
    rec["verdict"] = _verdict("necessity", rec["normalized_effect"], stats)
    table = _table(res, kl).assign(components=[",".join(names(c)) for c in [comps, *rand]])
    return ValidationResult("necessity", [rec], table, res.per_prompt(), {"n_variants": len(variants)}, res)


def sufficiency(model, task, comps: list[Component], ablation: Ablation | None = None, metric: str = "logit_diff",
                ablate_mlps: bool = False, n_random: int = MIN_RANDOM, seed: int = 0, n_boot: int = 1000,
                forwards=None, progress: bool = False) -> ValidationResult:
    """Keep only ``comps`` (ablate every other head, and MLP with ``ablate_mlps``), next to
    ``n_random`` random sets kept alone (module docstring)."""
    ablation = ablation or Ablation()
    _prepare(model, task, comps, n_random)
    rest = complement(model, comps, task.n_tokens, ablate_mlps)
    rand = random_sets(model, comps, n_random, seed) if n_random else []
    variants = [_ablate_variant(model, task, rest, ablation, "set", "set", {"random": None})]
    variants += [_ablate_variant(model, task, complement(model, r, task.n_tokens, ablate_mlps), ablation,
                                 f"random{j}", "random", {"random": j}) for j, r in enumerate(rand)]
    res, kl = _run(model, task, variants, metric, ablation, n_boot, seed, forwards, progress, "sufficiency")
    stats = baseline_stats(float(res.effect[0]), res.effect[1:])
    stats["random_kl_mean"] = float(np.mean(kl[1:])) if len(rand) else float("nan")
    rec = _record("sufficiency", res, kl, 0, comps, ablation, stats, ablate_mlps=ablate_mlps,
                  n_ablated=len(rest))
    rec["verdict"] = _verdict("sufficiency", rec["normalized_effect"], stats)
    table = _table(res, kl).assign(components=[",".join(names(c)) for c in [comps, *rand]])
    return ValidationResult("sufficiency", [rec], table, res.per_prompt(), {"n_variants": len(variants)}, res)


def minimality(model, task, comps: list[Component], ablation: Ablation | None = None, metric: str = "logit_diff",
               ablate_mlps: bool = False, n_random: int = MIN_RANDOM, seed: int = 0, n_boot: int = 1000,
               forwards=None, progress: bool = False) -> ValidationResult:
    """For each member ``v``: the set kept alone with and without ``v``. Random baseline: for
    each random set, kept alone with and without one of its members (seeded choice): the drop
    that removing a member of a circuit of this shape causes by chance (module docstring)."""
    ablation = ablation or Ablation()
    _prepare(model, task, comps, n_random)
    if len(comps) < 2:
        raise ReplabError("minimality needs a set of at least 2 components")
    rand = random_sets(model, comps, n_random, seed) if n_random else []
    rng = np.random.default_rng([seed, 1])

    def keep(members, name, group, info):
        return _ablate_variant(model, task, complement(model, members, task.n_tokens, ablate_mlps), ablation,
                               name, group, info)
    variants = [keep(comps, "set", "set", {"random": None, "without": None})]
    variants += [keep([x for x in comps if x != c], f"set-{i}", "set", {"random": None, "without": i})
                 for i, c in enumerate(comps)]
    picks = [int(rng.integers(len(comps))) for _ in rand]
    for j, (r, i) in enumerate(zip(rand, picks, strict=True)):
        variants.append(keep(r, f"random{j}", "random", {"random": j, "without": None}))
        variants.append(keep([x for k, x in enumerate(r) if k != i], f"random{j}-{i}", "random",
                             {"random": j, "without": i}))
    res, kl = _run(model, task, variants, metric, ablation, n_boot, seed, forwards, progress, "minimality")
    eff = res.effect
    m = len(comps) + 1
    drops = [float(eff[m + 2 * j] - eff[m + 2 * j + 1]) for j in range(len(rand))]
    records = []
    for i, c in enumerate(comps):
        row = 1 + i
        delta = float(eff[0] - eff[row])
        lo, hi = _delta_ci(res, 0, row)
        stats = baseline_stats(delta, drops)
        rec = _record("minimality", res, kl, row, [c], ablation, stats, ablate_mlps=ablate_mlps,
                      set_components=names(comps), metric_with=float(res.patched[0].mean()),
                      normalized_effect_with=float(eff[0]), delta=delta, delta_ci_low=lo, delta_ci_high=hi)
        rec["verdict"] = (f"{c.name} matters: the set loses {delta:+.2f} of the effect without it (CI {lo:+.2f} to "
                          f"{hi:+.2f}; a random member of a random set: mean {stats['random_mean']:+.2f}, "
                          f"p95 {stats['random_p95']:+.2f})"
                          if lo > 0 else
                          f"{c.name} is not needed: removing it changes the set's effect by {delta:+.2f} (CI {lo:+.2f} "
                          f"to {hi:+.2f})")
        records.append(rec)
    table = _table(res, kl)
    return ValidationResult("minimality", records, table, res.per_prompt(), {"n_variants": len(variants)}, res)


def _delta_ci(res, a: int, b: int, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap CI of ``effect[a] − effect[b]`` (same resamples for both rows)."""
    w = res.weights
    c, x = w @ res.clean, w @ res.corrupt
    with np.errstate(divide="ignore", invalid="ignore"):
        ea = (w @ res.patched[a] - x) / (c - x)
        eb = (w @ res.patched[b] - x) / (c - x)
    d = ea - eb
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
