"""``replab circuit prune|compare``: one call each, writing a run directory.

prune: ``config.yaml``, ``levels`` (order × threshold: surviving heads, re-measured
performance), ``curves`` (performance along every order), ``survival`` (per head and
threshold), ``level_diffs`` (heads shared / different between an order's levels),
``greedy_checks`` (with ``candidates``), ``pareto`` and ``survival`` figures, and
``summary.json`` (``levels``, timing and forward counts per order, agreement).

compare: ``overlap`` (per level: shared, only-A, only-B, Jaccard) and ``cross`` (each
circuit on both tasks), ``summary.json``.
"""

from __future__ import annotations

import pandas as pd

from replab.circuits.ablation import Ablation
from replab.circuits.runs import finish, load, runner, start
from replab.distributed import check_engine
from replab.patching.executors import engine_scope
from replab.rundir import write_table


@runner("prune")
def run_prune(task: str = "sequences", out=None, model: str | None = None, dataset=None, classes=None,
              template=None, limit=None, thresholds="0.97,0.9,0.8,0.7", orders="greedy,attribution,reverse,random:20",
              metric: str = "logit_diff", ablation: str = "mean", mean_over=None, candidates: int | None = None,
              check_every: int = 10, seed: int = 0, n_boot: int = 200, progress: bool = True,
              engine: str = "local", workers: int | None = None, address: str | None = None) -> dict:
    """Iterative pruning (:func:`replab.circuits.prune.prune_heads`) on a task, saved to ``out``.

    Args:
        thresholds: performance levels, e.g. ``"0.97,0.9,0.8,0.7"``.
        orders: ``greedy``, ``attribution``, ``reverse``, ``forward``, ``random:N``.
        candidates: greedy evaluates exactly only the K heads attribution ranks least harmful.
        check_every: with ``candidates``: every this many steps also run exact greedy's step.
        engine, workers, address: ``engine="ray"`` runs the batched engine runs on ``workers``
            Ray actors of the cluster at ``address`` (:mod:`replab.patching.executors`); the
            levels are the local engine's. Not part of the config (a replay runs locally).
    Returns:
        The summary (``levels``: ``order, threshold, heads, n_heads, performance, ablation,
        metric``, ...) written to ``<out>/summary.json``, plus ``out``.
    """
    from replab.circuits.plots import pareto, survival_heatmap
    from replab.circuits.prune import parse_orders, parse_thresholds, prune_heads
    from replab.patching.plots import save_figure

    check_engine(engine, workers, address)    # before the model loads: "pip install 'replab[ray]'"
    abl = Ablation(ablation, mean_over, seed)
    ths = parse_thresholds(thresholds)
    parse_orders(orders)
    m, t = load(model, task, dataset, classes, template, limit)
    options = {"task": task, "dataset": dataset, "classes": classes, "template": template, "limit": limit,
               "model": model, "thresholds": ",".join(f"{x:g}" for x in ths),
               "orders": orders if isinstance(orders, str) else ",".join(orders), "metric": metric,
               "ablation": abl.kind, "mean_over": mean_over, "candidates": candidates, "check_every": check_every,
               "seed": seed, "n_boot": n_boot}
    out = start(out or "runs/circuit-prune", "prune", options)
    with engine_scope(engine, workers=workers, address=address) as eng:
        res = prune_heads(m, t, ths, orders, abl, metric, candidates, check_every, seed, n_boot, progress, eng)
    files = write_table(pd.DataFrame(res.levels), out, "levels") + write_table(res.curves, out, "curves")
    files += write_table(res.survival, out, "survival") + write_table(res.diffs, out, "level_diffs")
    if res.agreement.get("checks"):
        files += write_table(pd.DataFrame(res.agreement["checks"]), out, "greedy_checks")
    title = f"pruning {t.name} ({abl.describe()} ablation, {metric})"
    files += save_figure(pareto(res.curves, pd.DataFrame(res.levels), title), out / "pareto")
    files += save_figure(survival_heatmap(res.survival, m.cfg.n_layers, m.cfg.n_heads,
                                          f"head survival across {len(res.summary['orders'])} orders, {t.name}"),
                         out / "survival")
    agreement = {k: v for k, v in res.agreement.items() if k != "checks"}
    summary = {"task": t.describe(), **res.summary, "levels": res.levels, "agreement": agreement, "files": files}
    return finish(out, summary, m)


@runner("compare")
def run_compare(run_a, run_b, out=None, cross: bool = True, progress: bool = True, model=None) -> dict:
    """Compare the circuits of two runs (:mod:`replab.circuits.compare`): overlap per level,
    and (``cross``) each circuit's performance on both runs' tasks. ``model``: an already
    loaded model for the cross-performance (it must be the runs' model; default: load it)."""
    from replab.circuits.compare import circuits_of, compare_circuits, cross_performance

    ca, cfg_a = circuits_of(run_a)
    cb, cfg_b = circuits_of(run_b)
    out = start(out or "runs/circuit-compare", "compare", {"run_a": str(run_a), "run_b": str(run_b), "cross": cross})
    overlap = compare_circuits(ca, cb)
    files = write_table(overlap, out, "overlap")
    summary = {"run_a": str(run_a), "run_b": str(run_b), "overlap": overlap.to_dict("records")}
    if cross:
        oa, ob = cfg_a["options"], cfg_b["options"]
        if oa.get("model") != ob.get("model"):
            from replab.errors import ReplabError

            raise ReplabError(f"the runs use different models ({oa.get('model')} vs {ob.get('model')}): "
                              "cross-performance needs one model (use --no-cross)")
        from replab.circuits.runs import model_option
        from replab.models import load_model
        from replab.patching.catalog import load_task

        tables = []
        both = {**{f"A:{k}": v for k, v in ca.items()}, **{f"B:{k}": v for k, v in cb.items()}}
        if model is None:
            model = load_model(oa.get("model"), device="cpu")
        elif model_option(model) != oa.get("model"):
            from replab.errors import ReplabError

            raise ReplabError(f"the runs use model {oa.get('model')}, not {model_option(model)}")
        for side, o in (("A", oa), ("B", ob)):
            t = load_task(o.get("task", "next_day"), model.tokenizer, template=o.get("template"), limit=o.get("limit"),
                          prepend_bos=bool(model.cfg.default_prepend_bos), classes=o.get("classes"),
                          dataset=o.get("dataset"))
            abl = Ablation(o.get("ablation") or "mean", o.get("mean_over"), o.get("seed", 0))
            metric = o.get("metric") or "logit_diff"
            tab = cross_performance(model, t, both, abl, metric)
            tables.append(tab.assign(task_of=side, task=t.name, metric=metric, ablation=abl.describe()))
        cross_df = pd.concat(tables, ignore_index=True)
        files += write_table(cross_df, out, "cross")
        summary["cross"] = cross_df.to_dict("records")
    summary["files"] = files
    return finish(out, summary, model)
