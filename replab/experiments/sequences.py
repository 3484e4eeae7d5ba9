"""``replab run sequences`` (W4): do number, month and weekday sequences share a circuit?

Stages, each one or a few library calls (nothing is re-implemented here):

1. ``prune``: iterative pruning of the heads of the sequence-continuation task down to each
   threshold along several orders (:func:`replab.circuits.prune_run.run_prune`); the circuit
   studied afterwards is the smallest level circuit at ``circuit_threshold``;
2. ``ablations``: that circuit kept alone (sufficiency) and removed (necessity) under several
   ablations, zero / mean / mean over another corruption's prompts, with KL to the clean run
   (:func:`replab.circuits.validate_run.run_sufficiency` / ``run_necessity``); then ``sites``:
   the circuit removed at one site at a time, its heads' q, k or v inputs, or their outputs at
   the last or the earlier positions (:mod:`replab.experiments.sequences_sites`);
3. ``heads``: head detectors (:func:`replab.heads.run_detect`), OV copy and next-item scores
   and QK previous-item scores on token sets (:func:`replab.heads.run_ov`, ``run_qk``) and the
   circuit heads' attention patterns (:func:`replab.heads.run_patterns`), joined for the
   circuit's heads (:mod:`replab.experiments.sequences_heads`);
4. ``geometry``: a harvest of the ``sequence_types`` set (:func:`replab.harvesting.harvest`),
   PCA / UMAP per layer coloured by sequence type (:func:`replab.geometry.plot_geometry`) and
   class-mean cosines per layer (:func:`replab.geometry.cosine_layers`);
5. ``compare``: the circuits of two sequence types (months, weekdays) pruned separately down to
   ``circuit_threshold`` and compared, overlap and each circuit on the other's task
   (:func:`replab.circuits.prune_run.run_compare`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab.circuits.ablation import Ablation
from replab.circuits.prune import parse_orders, parse_thresholds
from replab.circuits.prune_run import run_compare, run_prune
from replab.circuits.validate_run import run_necessity, run_sufficiency
from replab.errors import ReplabError
from replab.experiments.sequences_common import MAX_ROWS, items, run_command, task_name
from replab.experiments.sequences_heads import heads_stage
from replab.experiments.sequences_report import headline, narrative
from replab.experiments.sequences_sites import parse_sites, sites
from replab.experiments.spec import Experiment, Stage, model_flag, rel
from replab.geometry import cosine_layers, plot_geometry
from replab.geometry.plots import plot_cosines
from replab.harvesting import harvest
from replab.patching.sequences import parse_sequence_spec
from replab.rundir import write_table

DEFAULTS = {
    "types": "number_words,months,weekdays",   # sequence types of the task (sequence_types set)
    "corruption": "shift",                     # shift | repeat | random (replab/patching/sequences.py)
    "limit": 12,                               # prompt pairs for pruning and ablations (None: all)
    "thresholds": "0.97,0.9,0.8,0.7",
    "orders": "attribution,reverse,random:2",  # greedy is exact but costs about H^2/2 forwards
    "candidates": None,                        # greedy: evaluate only K attribution candidates
    "ablation": "mean",                        # how pruning removes a head
    "metric": "logit_diff",
    "n_boot": 200,
    "circuit_threshold": 0.8,                  # the level studied by the later stages
    "ablations": "zero,mean,mean-other/repeat,mean-other/random",
    "ablation_tests": "sufficiency,necessity",
    "sites": "output,last,earlier,q,k,v",      # the circuit ablated at one site at a time (necessity)
    "n_random": 20,                            # random sets of the same layer profile (0 or >= 20)
    "detectors": "previous,duplicate,induction",
    "n_seqs": 10,
    "ov_tokens": "digits,months,weekdays",
    "pattern_prompt": "January, February, March,",
    "max_pattern_heads": 16,
    "geometry_dataset": "sequence_types",
    "geometry_positions": "last_item_last",    # the last shown item's token ("3", " three")
    "geometry_layers": "all",
    "umap_layers": 6,                          # evenly spaced layers for UMAP (0: no UMAP)
    "geometry_pairs": "digits:number_words,months:weekdays,digits:decreasing_digits",
    "compare_types": "months,weekdays",
    "compare_limit": 8,
    "compare_orders": "attribution",
    "seed": 0,
}
QUICK = {"limit": 4, "thresholds": "0.9,0.8", "orders": "attribution,reverse", "circuit_threshold": 0.8,
         "ablations": "zero,mean,mean-other/repeat", "ablation_tests": "sufficiency", "n_random": 0,
         "n_boot": 50, "n_seqs": 3, "ov_tokens": "weekdays", "geometry_layers": "0-7", "umap_layers": 0,
         "max_pattern_heads": 6, "compare_limit": 3, "compare_orders": "reverse"}


_TESTS = {"sufficiency": run_sufficiency, "necessity": run_necessity}


def _level_key(r: dict) -> tuple:
    return (r["n_heads"], r["order"])


def _check(c: dict) -> None:
    """Options every stage relies on, checked before the first (slow) stage runs."""
    ths = parse_thresholds(c["thresholds"])
    if c["circuit_threshold"] not in ths:
        raise ReplabError(f"circuit_threshold {c['circuit_threshold']} is not one of the thresholds {ths}")
    parse_orders(c["orders"])
    parse_orders(c["compare_orders"])
    if len(items(c["compare_types"])) != 2:
        raise ReplabError(f"compare_types needs two sequence types, not {c['compare_types']!r}")
    unknown = [t for t in items(c["ablation_tests"]) if t not in _TESTS]
    if unknown:
        raise ReplabError(f"unknown ablation test(s) {', '.join(unknown)} (use {', '.join(_TESTS)})")
    for spec in items(c["ablations"]):
        kind, mean_over = _ablation_spec(spec, c)
        Ablation(kind, mean_over, c["seed"])
    parse_sites(c["sites"])
    for pair in items(c["geometry_pairs"]):
        if len(pair.split(":")) != 2:
            raise ReplabError(f"geometry_pairs: {pair!r} is not TYPE:TYPE")


def prune(ctx) -> dict:
    c = ctx.config
    _check(c)
    orders = parse_orders(c["orders"])
    s = run_prune(task=task_name(c), out=ctx.out, model=ctx.model, limit=c["limit"], thresholds=c["thresholds"],
                  orders=c["orders"], metric=c["metric"], ablation=c["ablation"], candidates=c["candidates"],
                  seed=c["seed"], n_boot=c["n_boot"], progress=ctx.progress)
    levels = [{"order": lv["order"], "threshold": lv["threshold"], "n_heads": lv["n_heads"],
               "performance": lv["performance"], "search_performance": lv["search_performance"], "kl": lv["kl"],
               "heads": lv["heads"] if lv["n_heads"] <= MAX_ROWS else None} for lv in s["levels"]]
    at = [lv for lv in s["levels"] if lv["threshold"] == c["circuit_threshold"] and lv["n_heads"] > 0]
    if not at:
        raise ReplabError(f"every order removes all heads at {c['circuit_threshold']}: no circuit to study "
                          "(more prompts, or a higher circuit_threshold)")
    best = min(at, key=_level_key)
    circuit = {"order": best["order"], "threshold": best["threshold"], "heads": best["heads"],
               "n_heads": best["n_heads"], "performance": best["performance"], "kl": best["kl"],
               "normalized_effect": best["normalized_effect"]}
    # the two orders with the smallest circuits at that threshold: which heads they share
    by_order = sorted(at, key=_level_key)
    shared = None
    if len(by_order) > 1:
        a, b = by_order[0], by_order[1]
        both = sorted(set(a["heads"]) & set(b["heads"]))
        shared = {"order_a": a["order"], "order_b": b["order"], "n_a": a["n_heads"], "n_b": b["n_heads"],
                  "n_shared": len(both), "heads": both}
    surv = pd.read_parquet(ctx.out / "survival.parquet")
    surv = surv[surv["threshold"] == c["circuit_threshold"]]
    always = surv[surv["survival"] == 1.0]["head"].tolist()
    rises = [lv for lv in levels if lv["performance"] > 1.0]
    return {
        "task": s["task"]["name"] if isinstance(s.get("task"), dict) and "name" in s["task"] else task_name(c),
        "n_prompts": s["prompts"], "n_tokens": s["tokens"], "orders": s["orders"], "n_orders": len(s["orders"]),
        "order_names": orders, "thresholds": s["thresholds"], "n_heads_model": s["n_heads"],
        "clean_metric": s["clean_metric"], "corrupt_metric": s["corrupt_metric"], "intact_metric": s["intact_metric"],
        "levels": levels, "circuit": circuit, "shared": shared,
        "survive_every_order": always, "n_survive_every_order": len(always),
        "max_remeasure_diff": max(abs(lv["performance"] - lv["search_performance"]) for lv in levels),
        "n_levels_above_intact": len(rises),
        "variant_forwards": {o: t["variant_forwards"] for o, t in s["timing"].items()},
        "figures": [rel(ctx.out / "pareto.png", ctx.run_dir), rel(ctx.out / "survival.png", ctx.run_dir)],
        "command": run_command(s, ctx.out),
    }


def _ablation_spec(spec: str, c: dict) -> tuple[str, str | None]:
    """``mean-other/repeat`` -> (``mean-other``, the task's types under the repeat corruption)."""
    kind, _, corruption = spec.partition("/")
    if kind != "mean-other":
        return kind, None
    types, _ = parse_sequence_spec(c["types"])
    return kind, f"sequences:{','.join(types)}/{corruption or 'random'}#corrupt"


def ablations(ctx) -> dict:
    c = ctx.config
    heads = ctx.results["prune"]["circuit"]["heads"]
    tests = items(c["ablation_tests"])
    rows, figures, commands = [], [], []
    for test in tests:
        for spec in items(c["ablations"]):
            kind, mean_over = _ablation_spec(spec, c)
            out = ctx.out / f"{test}_{spec.replace('/', '-')}"
            s = _TESTS[test](heads, task=task_name(c), out=out, model=ctx.model, limit=c["limit"], metric=c["metric"],
                          ablation=kind, mean_over=mean_over, n_random=c["n_random"], seed=c["seed"],
                          n_boot=c["n_boot"], progress=ctx.progress)
            r = s["records"][0]
            rows.append({"test": test, "ablation": spec, "performance": r["metric"] / r["clean_metric"],
                         "normalized_effect": r["normalized_effect"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                         "kl": r["kl"], "random_mean": r.get("random_mean"), "random_p95": r.get("random_p95"),
                         "random_p05": r.get("random_p05"), "verdict": r.get("verdict")})
            if test == tests[0] and (out / "random_baseline.png").is_file() and c["n_random"]:
                figures.append(rel(out / "random_baseline.png", ctx.run_dir))
            commands.append(run_command(s, out))
    first = [r for r in rows if r["test"] == tests[0]]
    harshest = min(first, key=lambda r: r["performance"])
    most_kl = max(first, key=lambda r: r["kl"])
    mean_row = next((r for r in first if r["ablation"] == c["ablation"]), None)
    judged = [r for r in rows if r["random_mean"] is not None]
    beyond = [r for r in judged if str(r["verdict"]).startswith(("sufficient beyond", "necessary beyond"))]
    return {"n_heads": len(heads), "tests": tests, "rows": rows, "harshest": harshest["ablation"],
            "n_random_tests": len(judged), "n_beyond_chance": len(beyond),
            "harshest_performance": harshest["performance"], "largest_kl": most_kl["ablation"],
            "largest_kl_value": most_kl["kl"],
            "same_ablation_performance": mean_row["performance"] if mean_row else None,
            "figures": figures, "command": " && ".join(commands)}


def _spaced(n_layers: int, k: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, min(k, n_layers))})


def _pair_summary(cos: pd.DataFrame, a: str, b: str) -> dict:
    """The cosine of two classes per layer, and from which layer on ``b`` is ``a``'s closest class."""
    pair = cos[(cos["class_a"] == a) & (cos["class_b"] == b)].sort_values("layer")
    if pair.empty:
        raise ReplabError(f"geometry_pairs: {a!r} or {b!r} is not a sequence type of the harvest")
    others = cos[(cos["class_a"] == a) & (cos["class_b"] != a)]
    nearest = others.loc[others.groupby("layer")["cosine"].idxmax()].set_index("layer")["class_b"]
    closest_from = None
    for layer in sorted(nearest.index, reverse=True):
        if nearest[layer] != b:
            break
        closest_from = int(layer)
    top = pair.loc[pair["cosine"].idxmax()]
    return {"a": a, "b": b, "first_layer": int(pair["layer"].iloc[0]), "cosine_first": float(pair["cosine"].iloc[0]),
            "last_layer": int(pair["layer"].iloc[-1]), "cosine_last": float(pair["cosine"].iloc[-1]),
            "max_layer": int(top["layer"]), "cosine_max": float(top["cosine"]),
            "baseline": float(pair["baseline"].iloc[0]),
            "closest_from": closest_from, "closest_last": str(nearest.iloc[-1])}


def geometry(ctx) -> dict:
    c = ctx.config
    store_dir = ctx.out / "store"
    store = harvest(ctx.model, dataset=c["geometry_dataset"], hooks=("resid_post",), layers=c["geometry_layers"],
                    positions=c["geometry_positions"], out=store_dir, progress=ctx.progress)
    commands = [f"replab harvest{model_flag(ctx)} --dataset {c['geometry_dataset']} --hooks resid_post "
                f"--layers {c['geometry_layers']} --positions {c['geometry_positions']} --out {store_dir}"]
    pca = plot_geometry(store, "seq_type", "pca", out=ctx.out, seed=c["seed"])
    figures = [rel(pca["figure"], ctx.run_dir)]
    commands.append(f"replab plot pca --store {store_dir} --color seq_type --out {ctx.out}")
    umap_layers = _spaced(ctx.model.cfg.n_layers, c["umap_layers"]) if c["umap_layers"] else []
    umap_layers = [x for x in umap_layers if x in pca["layers"]]
    if umap_layers:
        spec = ",".join(map(str, umap_layers))
        u = plot_geometry(store, "seq_type", "umap", out=ctx.out, layers=spec, seed=c["seed"], progress=ctx.progress)
        figures.append(rel(u["figure"], ctx.run_dir))
        commands.append(f"replab plot umap --store {store_dir} --color seq_type --layers {spec} --seed {c['seed']} "
                        f"--out {ctx.out}")
    cos = cosine_layers(store, "seq_type")
    write_table(cos, ctx.out, "cosine_seq_type")
    png = plot_cosines(cos, ctx.out / "cosine_seq_type", title="cosine of sequence-type mean directions per layer "
                       f"({c['geometry_positions']})")
    figures.append(rel(png, ctx.run_dir))
    commands.append(f"replab plot cosine --store {store_dir} --color seq_type --out {ctx.out}")
    pairs = [p.split(":") for p in items(c["geometry_pairs"])]
    summaries = [_pair_summary(cos, a.strip(), b.strip()) for a, b in pairs]
    counts = store.index["seq_type"].value_counts()
    off = cos[cos["class_a"] != cos["class_b"]]             # pairs of different types
    by_layer = []
    for layer, sub in cos.groupby("layer"):
        row = {"layer": int(layer)}
        for p in summaries:
            hit = sub[(sub["class_a"] == p["a"]) & (sub["class_b"] == p["b"])]
            row[f"{p['a']}~{p['b']}"] = float(hit["cosine"].iloc[0])
        by_layer.append(row)
    return {"n_rows": int(len(store.index)), "n_types": int(len(counts)), "types": sorted(counts.index.tolist()),
            "layers": pca["layers"], "umap_layers": umap_layers, "positions": c["geometry_positions"],
            "pairs": summaries, "cosine_by_layer": by_layer,
            "cosine_min": float(off["cosine"].min()), "cosine_max": float(off["cosine"].max()),
            "chance": float(off["baseline"].mean()),
            "figures": figures, "command": " && ".join(commands)}


def compare(ctx) -> dict:
    c = ctx.config
    types = items(c["compare_types"])
    th = c["circuit_threshold"]
    runs, commands, sizes = [], [], {}
    for t in types:
        s = run_prune(task=task_name(c, t), out=ctx.out / t, model=ctx.model, limit=c["compare_limit"],
                      thresholds=f"{th:g}", orders=c["compare_orders"], metric=c["metric"],
                      ablation=c["ablation"], seed=c["seed"], n_boot=c["n_boot"], progress=ctx.progress)
        runs.append(ctx.out / t)
        commands.append(run_command(s, ctx.out / t))
        sizes[t] = {"n_prompts": s["prompts"], "clean_metric": s["clean_metric"]}
    s = run_compare(runs[0], runs[1], out=ctx.out / "compare", cross=True, model=ctx.model, progress=ctx.progress)
    commands.append(f"replab circuit compare {runs[0]} {runs[1]} --out {ctx.out / 'compare'}")
    order = parse_orders(c["compare_orders"])[0]
    label = f"{order}@{th:g}"
    ov = next(r for r in s["overlap"] if r["level_a"] == label and r["level_b"] == label)
    cross = {(r["circuit"], r["task_of"]): r for r in s["cross"]}
    perf = lambda side, task: cross[(f"{side}:{label}", task)]["performance"]  # noqa: E731
    overlap = [{"level": r["level_a"], "n_a": r["n_a"], "n_b": r["n_b"], "n_shared": r["n_shared"],
                "jaccard": r["jaccard"]} for r in s["overlap"]]
    return {"a": types[0], "b": types[1], "order": order, "threshold": th, "sizes": sizes,
            "n_a": ov["n_a"], "n_b": ov["n_b"], "n_shared": ov["n_shared"], "jaccard": ov["jaccard"],
            "shared": ov["shared"] if len(ov["shared"]) <= MAX_ROWS else None,
            "a_on_a": perf("A", "A"), "a_on_b": perf("A", "B"), "b_on_b": perf("B", "B"), "b_on_a": perf("B", "A"),
            "overlap": overlap, "command": " && ".join(commands)}


STAGES = (
    Stage("prune", "iterative pruning of heads along several orders", prune,
          ("types", "corruption", "limit", "thresholds", "orders", "candidates", "ablation", "metric", "n_boot",
           "circuit_threshold", "seed"), slow=True),
    Stage("ablations", "the circuit under zero / mean / mean-other ablations, with KL", ablations,
          ("ablations", "ablation_tests", "n_random")),
    Stage("sites", "the circuit ablated by site: q, k, v, last and earlier positions", sites, ("sites",)),
    Stage("heads", "head detectors, OV next-item and QK previous-item scores, attention patterns", heads_stage,
          ("detectors", "n_seqs", "ov_tokens", "pattern_prompt", "max_pattern_heads")),
    Stage("geometry", "PCA / UMAP and class-mean cosines of sequence types per layer", geometry,
          ("geometry_dataset", "geometry_positions", "geometry_layers", "umap_layers", "geometry_pairs")),
    Stage("compare", "the circuits of two sequence types compared", compare,
          ("compare_types", "compare_limit", "compare_orders"), slow=True),
)

EXPERIMENT = Experiment(
    name="sequences", workflow="W4", title="Do number, month and weekday sequences share a circuit?",
    description=("Pruning at several thresholds and orders, ablation variants with KL, head detectors and OV "
                 "next-item scores, the geometry of sequence types per layer, and the circuits of two sequence "
                 "types compared."),
    defaults=DEFAULTS, quick=QUICK, stages=STAGES, headline=headline, narrative=narrative)
