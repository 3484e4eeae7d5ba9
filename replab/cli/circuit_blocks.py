"""``replab circuit blocks|hydra|grid``: block sweeps at a layer, backup heads, and the
generalisation grid (W3 steps 1–3 and 5).

Only parses options and prints; the work is :mod:`replab.circuits.blocks_run`.
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

LAYER = typer.Option(None, "--layer", help="The candidate layer (e.g. the feature scan's choice).")
LAYERS = typer.Option(None, "--layers", help="A layer range instead (e.g. 18-22).")
POSITIONS = typer.Option(None, "--positions", help="all (default) or a rule: last, entity_last, -1, 3,4.")


@app.command("blocks", epilog=examples(
    "replab circuit blocks --task superclass --classes artist,scientist --layer 20 --metric class_mass",
    "replab circuit blocks --task next_day --layers 20-24 --positions last --json"))
def blocks_cmd(layer: int = LAYER, layers: str = LAYERS, task: str = TASK, dataset: str = DATASET,
               classes: str = CLASSES, template: str = TEMPLATE, limit: int = LIMIT, metric: str = METRIC,
               ablation: str = typer.Option("zero", "--ablation", help="zero | mean | resample | mean-other."),
               mean_over: str = MEAN_OVER, positions: str = POSITIONS, seed: int = SEED, n_boot: int = N_BOOT,
               out: str = OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Necessity (ablate) and sufficiency (clean→corrupt) of the residual stream, each head and
    the MLP at a layer: one table with every candidate's logit, and a heatmap."""
    from replab.circuits.blocks_run import run_blocks

    s = run_blocks(layer, layers, task=task, out=out, model=model, dataset=dataset, classes=classes,
                   template=template, limit=limit, metric=metric, ablation=ablation, mean_over=mean_over,
                   positions=positions, seed=seed, n_boot=n_boot, progress=not json_out)
    lines = [f"clean {s['metric']} {s['clean_metric']:.3f}, corrupt {s['corrupt_metric']:.3f}"]
    for test in ("necessity", "sufficiency"):
        rows = sorted([r for r in s["records"] if r["test"] == test], key=lambda r: r["normalized_effect"],
                      reverse=test == "sufficiency")
        lines.append(f"{test}: " + ", ".join(f"L{r['layer']}{r['block']} {r['normalized_effect']:.2f}"
                                             for r in rows[:8]))
    done(s, json_out, lines)


@app.command("hydra", epilog=examples("replab circuit hydra --task next_day --ablate L23H3",
                                      "replab circuit hydra --task next_day --ablate L23H3,L23H5 --ablation zero "
                                      "--json"))
def hydra_cmd(ablate: str = typer.Option(..., "--ablate", help="The critical set (components)."),
              task: str = TASK, dataset: str = DATASET, classes: str = CLASSES, template: str = TEMPLATE,
              limit: int = LIMIT, metric: str = METRIC,
              ablation: str = typer.Option("mean", "--ablation", help="zero | mean | resample | mean-other | corrupt."),
              mean_over: str = MEAN_OVER,
              min_fraction: float = typer.Option(0.1, "--min-fraction",
                                                 help="A backup compensates at least this fraction of the lost "
                                                      "direct effect."),
              seed: int = SEED, n_boot: int = N_BOOT, out: str = OUT, model: str = MODEL_OPT,
              json_out: bool = JSON_OPT) -> None:
    """Ablate a critical set and rank every other head by how much its direct effect rises."""
    from replab.circuits.blocks_run import run_hydra

    s = run_hydra(ablate, task=task, out=out, model=model, dataset=dataset, classes=classes, template=template,
                  limit=limit, metric=metric, ablation=ablation, mean_over=mean_over, min_fraction=min_fraction,
                  seed=seed, n_boot=n_boot, progress=not json_out)
    lines = [f"ablating {','.join(s['ablate'])} ({s['ablation']}): {s['metric']} {s['clean_metric']:.3f} -> "
             f"{s['ablated_metric']:.3f}; lost direct effect {s['lost_direct_effect']:+.3f}"]
    lines += [f"  {r['head']}: {r['dla_clean']:+.3f} -> {r['dla_ablated']:+.3f} ({r['compensation']:+.3f})"
              for r in s["top"][:6]]
    lines.append(s["verdict"])
    done(s, json_out, lines)


@app.command("grid", epilog=examples(
    "replab circuit grid --task superclass --classes artist,athlete,scientist,politician,writer --layer 20",
    "replab circuit grid --task sequences --label seq_type --sweep necessity --components circuit.json",
    "replab circuit grid --task superclass --layer 20 --positions entity_last --pairs 24 --json"))
def grid_cmd(sweep: str = typer.Option("blocks", "--sweep", help="blocks | necessity | sufficiency."),
             task: str = typer.Option("superclass", "--task", "-t",
                                      help="superclass (every ordered class pair, with controls) or a task split "
                                           "by --label."),
             layer: int = LAYER, layers: str = LAYERS,
             components: str = typer.Option(None, "--components", "-c", help="For necessity / sufficiency."),
             classes: str = typer.Option(None, "--classes",
                                         help="Super-classes (default: artist,athlete,scientist,politician,writer)."),
             pairs: int = typer.Option(16, "--pairs", help="Entity pairs per class pair."),
             label: str = typer.Option(None, "--label", help="Per-prompt label to split by (e.g. seq_type)."),
             controls: bool = typer.Option(True, "--controls/--no-controls",
                                           help="Also run the invented / ambiguous people (superclass)."),
             metric: str = typer.Option(None, "--metric", help="Default class_mass (superclass), else logit_diff."),
             ablation: str = typer.Option(None, "--ablation", help="Default zero (blocks) or mean."),
             mean_over: str = MEAN_OVER, positions: str = POSITIONS,
             ablate_mlps: bool = typer.Option(False, "--ablate-mlps/--no-ablate-mlps"),
             silent_fraction: float = typer.Option(0.25, "--silent-fraction",
                                                   help="Silent on controls: change at most this fraction of the "
                                                        "change on real people."),
             dataset: str = DATASET, template: str = TEMPLATE, limit: int = LIMIT, seed: int = SEED,
             n_boot: int = typer.Option(200, "--n-boot"), out: str = OUT, model: str = MODEL_OPT,
             json_out: bool = JSON_OPT) -> None:
    """Repeat a block sweep or validation over many classes (or a label column), split by class,
    with negative controls reported separately."""
    from replab.circuits.blocks_run import run_grid

    s = run_grid(sweep, task, layer, layers, components, out=out, model=model, dataset=dataset, classes=classes,
                 template=template, limit=limit, pairs=pairs, label=label, controls=controls, metric=metric,
                 ablation=ablation, mean_over=mean_over, positions=positions, ablate_mlps=ablate_mlps,
                 silent_fraction=silent_fraction, seed=seed, n_boot=n_boot, progress=not json_out)
    lines = [f"{s['sweep']} over {s['n_tasks']} task(s), {s['n_prompts']} prompt pairs, classes "
             f"{', '.join(s['classes'])}"]
    if s.get("controls_silent"):
        lines.append(f"controls: {s['controls_silent']}")
    done(s, json_out, lines)
