"""``replab circuit path``: path patching from sender heads into a receiver (W3 step 4).

Only parses options and prints; the work is :func:`replab.circuits.path_run.run_path`.
"""

from __future__ import annotations

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples
from replab.cli.circuit import app
from replab.cli.circuit_options import (
    CLASSES,
    DATASET,
    LIMIT,
    MEAN_OVER,
    METRIC,
    N_BOOT,
    OUT,
    SEED,
    TASK,
    TEMPLATE,
    done,
)


@app.command("path", epilog=examples(
    "replab circuit path --task next_day --sender L21H4,L22H1 --receiver logits",
    "replab circuit path --task next_day --sender all --receiver logits --freeze-mlps --json",
    "replab circuit path --task next_day --sender L20H1,L21H4 --each --receiver L23H3.v",
    "replab circuit path --task next_day --sender L21H4 --receiver L23H3.q --ablation mean"))
def path_cmd(sender: str = typer.Option(..., "--sender", "--senders",
                                        help="Sender heads (L3H2,L4H1,..., optionally @positions) or 'all' (every "
                                             "head below the receiver, each scored alone)."),
             receiver: str = typer.Option("logits", "--receiver",
                                          help="logits | L9H1.q | L9H1.k | L9H1.v | L12MLP (k/v: the KV head "
                                               "that query head reads)."),
             each: bool = typer.Option(False, "--each", help="Score every listed sender separately."),
             freeze_mlps: bool = typer.Option(False, "--freeze-mlps", help="Freeze the MLPs at clean too."),
             ablation: str = typer.Option("corrupt", "--ablation",
                                          help="What the senders' outputs become: corrupt (path patching) or "
                                               "zero | mean | resample | mean-other (ablate only that path)."),
             task: str = TASK, dataset: str = DATASET, classes: str = CLASSES, template: str = TEMPLATE,
             limit: int = LIMIT, metric: str = METRIC, mean_over: str = MEAN_OVER, seed: int = SEED,
             n_boot: int = N_BOOT, out: str = OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Path patching (Wang et al. 2022): senders from the corrupt run, every other head frozen at
    clean, MLPs recomputed (or frozen); the receiver's input recorded and replayed."""
    from replab.circuits.path_run import run_path

    s = run_path(sender, receiver, task=task, out=out, model=model, dataset=dataset, classes=classes,
                 template=template, limit=limit, metric=metric, ablation=ablation, mean_over=mean_over, each=each,
                 freeze_mlps=freeze_mlps, seed=seed, n_boot=n_boot, progress=not json_out)
    recs = sorted(s["records"], key=lambda r: r["normalized_effect"])
    frozen = ", MLPs frozen" if s["freeze_mlps"] else ""
    lines = [f"{len(recs)} sender set(s) into {s['receiver']} ({s['ablation']}{frozen}): "
             f"clean {s['metric']} {s['clean_metric']:.3f}, corrupt {s['corrupt_metric']:.3f}"]
    for r in recs[:10]:
        lines.append(f"  {'+'.join(r['sender'])}: {r['metric']:.3f}, normalised effect {r['normalized_effect']:.3f} "
                     f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
    if s.get("note"):
        lines.append(s["note"])
    lines.append("checks passed: " + ", ".join(f"{k} {v['value']:.2g}" for k, v in s["checks"].items()))
    done(s, json_out, lines)
