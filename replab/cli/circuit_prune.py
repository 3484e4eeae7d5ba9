"""``replab circuit prune|compare``: iterative pruning (W4 step 1) and circuit comparison.

Only parses options and prints; the work is :mod:`replab.circuits.prune_run`.
"""

from __future__ import annotations

import typer

from replab.cli._common import ADDRESS_OPT, ENGINE_OPT, JSON_OPT, MODEL_OPT, WORKERS_OPT, examples
from replab.cli.circuit import app
from replab.cli.circuit_options import (
    ABLATION,
    CLASSES,
    DATASET,
    LIMIT,
    MEAN_OVER,
    METRIC,
    OUT,
    SEED,
    TEMPLATE,
    done,
)

PRUNE_KEYS = ("levels", "thresholds", "orders", "ablation", "metric", "intact_metric", "timing", "variant_forwards",
              "engine_runs", "attribution_passes", "agreement", "seconds", "checks", "out")


@app.command("prune", epilog=examples(
    "replab circuit prune --task sequences --thresholds 0.97,0.9,0.8,0.7 --orders greedy,attribution,reverse,random:20",
    "replab circuit prune --task sequences --orders greedy --candidates 16 --json",
    "replab circuit prune --task next_day --orders attribution,random:5 --ablation zero --metric margin",
    "replab circuit prune --task sequences --orders greedy,random:20 --engine ray --address auto --workers 8"))
def prune_cmd(task: str = typer.Option("sequences", "--task", "-t", help="Task (default: sequences)."),
              thresholds: str = typer.Option("0.97,0.9,0.8,0.7", "--thresholds", help="Performance levels."),
              orders: str = typer.Option("greedy,attribution,reverse,random:20", "--orders",
                                         help="greedy | attribution | reverse (last layer first) | forward | random:N"),
              candidates: int = typer.Option(None, "--candidates", "-k",
                                             help="Greedy: evaluate exactly only the K heads attribution ranks "
                                                  "least harmful at each step."),
              check_every: int = typer.Option(10, "--check-every",
                                              help="With --candidates: every N steps also run the exact step "
                                                   "(agreement; 0: never)."),
              dataset: str = DATASET, classes: str = CLASSES, template: str = TEMPLATE, limit: int = LIMIT,
              metric: str = METRIC, ablation: str = ABLATION, mean_over: str = MEAN_OVER, seed: int = SEED,
              n_boot: int = typer.Option(200, "--n-boot", help="Bootstrap resamples for the levels' CIs."),
              engine: str = ENGINE_OPT, address: str = ADDRESS_OPT, workers: int = WORKERS_OPT,
              out: str = OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Remove heads until performance (ablated / intact metric) falls below each threshold,
    along several orders; every level re-measured exactly."""
    from replab.circuits.prune_run import run_prune

    s = run_prune(task=task, out=out, model=model, dataset=dataset, classes=classes, template=template, limit=limit,
                  thresholds=thresholds, orders=orders, metric=metric, ablation=ablation, mean_over=mean_over,
                  candidates=candidates, check_every=check_every, seed=seed, n_boot=n_boot, progress=not json_out,
                  engine=engine, workers=workers, address=address)
    lines = [f"intact {s['metric']} {s['intact_metric']:.3f}; {s['variant_forwards']} variant forwards in "
             f"{s['engine_runs']} engine runs, {s['seconds']:.0f} s"]
    named = [lv for lv in s["levels"] if not lv["order"].startswith("random")]
    for lv in named:
        lines.append(f"  {lv['order']:>11} ≥ {lv['threshold']:g}: {lv['n_heads']:3d} heads, performance "
                     f"{lv['performance']:.3f}")
    rnd = [lv for lv in s["levels"] if lv["order"].startswith("random")]
    if rnd:
        import numpy as np

        for th in s["thresholds"]:
            ns = [lv["n_heads"] for lv in rnd if lv["threshold"] == th]
            lines.append(f"  {len(ns)} random orders ≥ {th:g}: {np.median(ns):.0f} heads (median)")
    if s.get("agreement"):
        a = s["agreement"]
        lines.append(f"greedy with {a['candidates']} candidates: the exact choice was among them in "
                     f"{a['exact_choice_in_k']:.0%} of {a['steps_checked']} checked steps")
    done(s, json_out, lines, PRUNE_KEYS)


@app.command("compare", epilog=examples("replab circuit compare runs/prune-months runs/prune-weekdays",
                                        "replab circuit compare runs/prune-seq runs/prune-nextday --no-cross --json"))
def compare_cmd(run_a: str = typer.Argument(..., help="A circuit run directory (prune, or a component-set run)."),
                run_b: str = typer.Argument(..., help="Another circuit run directory."),
                cross: bool = typer.Option(True, "--cross/--no-cross",
                                           help="Evaluate each circuit on the other run's task."),
                out: str = OUT, json_out: bool = JSON_OPT) -> None:
    """Shared heads, heads only in one, Jaccard per level, and each circuit's performance on the other task."""
    from replab.circuits.prune_run import run_compare

    s = run_compare(run_a, run_b, out=out, cross=cross, progress=not json_out)
    lines = [f"{r['level_a']}: {r['n_shared']} shared, {len(r['only_a'])} only in A, {len(r['only_b'])} only in B, "
             f"Jaccard {r['jaccard']:.2f}" for r in s["overlap"][:12]]
    for r in s.get("cross", [])[:24]:
        lines.append(f"  circuit {r['circuit']} on task {r['task_of']} ({r['task']}): "
                     f"performance {r['performance']:.3f}")
    done(s, json_out, lines)
