"""``replab probe ...``: train probes over layers, apply a saved probe to a store."""

from __future__ import annotations

from pathlib import Path

import typer

from replab.cli._common import JSON_OPT, examples, human_console, print_json

app = typer.Typer(help="Train linear probes over layers (controls, ranks, LEACE); apply them.",
                  no_args_is_help=True)

TRAIN_EPILOG = examples(
    "replab probe train --store runs/superset --label superclass --out runs/probe_superclass",
    "replab probe train --store runs/superset --label superclass --split-by template --json",
    "replab probe train --store runs/superset --label superclass --layers 10-20 --rank 1..4",
    "replab probe train --store runs/superset --label superclass --kind lowrank --rank 2 --json",
    "replab probe train --store runs/superset --label superclass --threads 2 --no-erase",
    "replab probe train --store runs/seq_item --label seq_type --split-by start "
    "--control-type token_id --no-erase",
)


@app.command("train", epilog=TRAIN_EPILOG)
def train(
    store: Path = typer.Option(..., "--store", help="Activation store directory."),
    label: str = typer.Option(..., "--label", help="Index column to predict."),
    hook: str = typer.Option("resid_post", "--hook", help="Hook alias (resid_post, ...) or one full hook name."),
    layers: str = typer.Option("all", "--layers", help="all, 5, 0-9, 10-, 0,5,10."),
    kind: str = typer.Option("logistic,meandiff", "--kind",
                             help="Comma list of logistic, meandiff, lowrank "
                                  "(lowrank without --rank: 1..4)."),
    rank: str = typer.Option(None, "--rank",
                             help="Low-rank probes: K (one rank-K probe), 1..K (a rank sweep) "
                                  "or 1,2,4. The logistic probe is always fitted as the "
                                  "full-rank reference."),
    split_by: str = typer.Option("entity", "--split-by", help="Grouped folds: entity, template, token, or any column."),
    folds: int = typer.Option(5, "--folds", help="Outer CV folds."),
    where: str = typer.Option(None, "--where", help="pandas query on the index, e.g. \"template != 'famous'\"."),
    all_rows: bool = typer.Option(False, "--all-rows", help="Keep control and odd_one_out rows (no default filter)."),
    controls: bool = typer.Option(True, "--controls/--no-controls", help="Control task + shuffled-label baseline."),
    control_type: str = typer.Option(None, "--control-type",
                                     help="Column whose values are the control task's types "
                                          "(default: entity, else token_id)."),
    erase: bool = typer.Option(True, "--erase/--no-erase", help="LEACE necessity check on the logistic probe."),
    epsilon: float = typer.Option(0.02, "--epsilon", help="Rank tolerance (accuracy units)."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(1, "--threads", help="Layers swept in parallel (one CPU core each)."),
    out: Path = typer.Option(None, "--out", help="Run directory (default: <store>_probe_<label> next to the store)."),
    json_out: bool = JSON_OPT,
):
    """Sweep probes over layers with grouped nested CV; write tables, probes, directions, figure."""
    from replab.probes import ProbeConfig, parse_ranks, train_probes

    kinds = [k.strip() for k in kind.split(",") if k.strip()]
    ranks = parse_ranks(rank)
    if "lowrank" in kinds and not ranks:
        ranks = parse_ranks("1..4")
    cfg = ProbeConfig(label=label, site=hook, layers=layers, kinds=tuple(kinds), ranks=ranks,
                      split_by=split_by, folds=folds, where=where, default_filter=not all_rows,
                      controls=controls, control_type=control_type, erase=erase, epsilon=epsilon,
                      seed=seed, threads=threads)
    out = out or Path(store).parent / f"{Path(store).name}_probe_{label}"
    run = train_probes(store, config=cfg, out=out, progress=True)
    if json_out:
        print_json(run.to_json())
        return
    _print_table(run)


def _print_table(run) -> None:
    from rich.table import Table

    cols = ["layer", "kind", "rank", "accuracy", "balanced_accuracy", "ci_low", "ci_high",
            "heldout_balanced_accuracy", "matched_accuracy", "control_accuracy", "selectivity",
            "shuffled_accuracy", "erased_accuracy"]
    table = Table(title=f"probe sweep: {run.summary['label']} (best layer {run.best_layer})")
    short = {"balanced_accuracy": "bal acc", "heldout_balanced_accuracy": "held-out bal",
             "matched_accuracy": "acc (ctl folds)", "control_accuracy": "control",
             "shuffled_accuracy": "shuffled", "erased_accuracy": "after LEACE"}
    for c in cols:
        table.add_column(short.get(c, c), justify="right")
    for rec in run.records.to_dict("records"):
        style = "bold" if rec["layer"] == run.best_layer else None
        table.add_row(*[_fmt(rec.get(c)) for c in cols], style=style)
    con = human_console()
    con.print(table)
    data = run.summary["data"]
    con.print(f"rows {data['rows']} ({'; '.join(data['filter']) or 'no filter'}), "
              f"classes {data['class_counts']}, folds by {data['split_column']}"
              + (f" ({data['split_source']})" if data.get("split_source") else ""))
    if data.get("control_types"):
        con.print(f"control task: types = {data['control_types']}"
                  + (f" ({data['control_source']})" if data.get("control_source") else "")
                  + f", {data['control_folds']} "
                  f"{data['control_split']} folds ({data['control_coverage']:.0%} of rows' types "
                  f"seen in training); selectivity = acc (ctl folds) - control, same folds")
    if run.summary.get("rank"):
        best = run.summary["rank"]["layers"].get(run.best_layer)
        if best:
            con.print(f"layer {run.best_layer}: smallest rank within "
                      f"{run.summary['rank']['epsilon']:.2f} of full rank = {best['smallest_rank']}")
            if best.get("clusters"):
                merges = "; ".join(f"{'+'.join(m['a'])} | {'+'.join(m['b'])} @ {m['distance']:.2f}"
                                   for m in best["dendrogram"]["merges"])
                con.print(f"class directions, dendrogram (cosine distance; unrelated directions: "
                          f"{best['chance_distance']:.2f}): {merges}; "
                          f"largest-gap cut -> {best['n_clusters']} clusters {best['clusters']}")
    con.print(f"wrote {run.out}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if v != v else f"{v:.3f}"
    return str(v)


@app.command("apply", epilog=examples(
    "replab probe apply --probe runs/superset_probe_superclass/probes/logistic.json --store runs/other",
    "replab probe apply --probe runs/superset_probe_superclass --store runs/superset --layer 20 --json"))
def apply(
    probe: Path = typer.Option(..., "--probe", help="probes/<kind>.json, or a probe run directory."),
    store: Path = typer.Option(..., "--store", help="Store to score."),
    layer: int = typer.Option(None, "--layer", help="Probe layer (default: its best layer)."),
    label: str = typer.Option(None, "--label", help="Column to score against (default: the probe's label)."),
    out: Path = typer.Option(None, "--out", help="Write predictions here (Parquet + CSV)."),
    json_out: bool = JSON_OPT,
):
    """Score every row of a store with a saved probe (predictions and, if labelled, accuracy)."""
    from replab.probes import apply_probe

    preds, summary = apply_probe(probe, store, layer=layer, label=label)
    if out is not None:
        out = Path(out).with_suffix("")
        out.parent.mkdir(parents=True, exist_ok=True)
        preds.to_parquet(str(out) + ".parquet", index=False)
        preds.to_csv(str(out) + ".csv", index=False)
        summary["out"] = str(out) + ".parquet"
    if json_out:
        print_json(summary)
        return
    for k, v in summary.items():
        typer.echo(f"{k}: {_fmt(v)}")
