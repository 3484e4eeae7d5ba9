"""``replab circuit necessity|sufficiency|minimality|replay``: validate a component set.

Only parses options and prints; the work is :mod:`replab.circuits.validate_run` and
:func:`replab.circuits.replay.replay_run`.
"""

from __future__ import annotations

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples
from replab.cli.circuit import app
from replab.cli.circuit_options import (
    ABLATION,
    CLASSES,
    COMPONENTS,
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

N_RANDOM = typer.Option(20, "--n-random", help="Random sets of the same size and layer profile (>= 20, or 0).")
ABLATE_MLPS = typer.Option(False, "--ablate-mlps/--no-ablate-mlps",
                           help="Also ablate every MLP not in the set.")


def _lines(s: dict) -> list[str]:
    out = []
    for r in s["records"]:
        out.append(f"{','.join(r['components'])}: {r['metric_name']} {r['metric']:.3f} (clean {r['clean_metric']:.3f}, "
                   f"corrupt {r['corrupt_metric']:.3f}), normalised effect {r['normalized_effect']:.3f} "
                   f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}], KL {r['kl']:.4f}")
        out.append(f"  {r['verdict']}")
    return out


@app.command("necessity", epilog=examples(
    "replab circuit necessity --task next_day --components L23H3,L29H1,L23H0",
    "replab circuit necessity --task sequences --components circuit.json --ablation zero --metric kl --json",
    "replab circuit necessity --task next_day --components L23H3.v,L23H3@-1 --ablation resample"))
def necessity_cmd(components: str = COMPONENTS, task: str = TASK, dataset: str = DATASET, classes: str = CLASSES,
                  template: str = TEMPLATE, limit: int = LIMIT, metric: str = METRIC, ablation: str = ABLATION,
                  mean_over: str = MEAN_OVER, n_random: int = N_RANDOM, seed: int = SEED, n_boot: int = N_BOOT,
                  out: str = OUT, model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Ablate the set in the clean run: metric, KL, normalised effect with CI, random-set baseline."""
    from replab.circuits.validate_run import run_necessity

    s = run_necessity(components, task=task, out=out, model=model, dataset=dataset, classes=classes,
                      template=template, limit=limit, metric=metric, ablation=ablation, mean_over=mean_over,
                      n_random=n_random, seed=seed, n_boot=n_boot, progress=not json_out)
    done(s, json_out, _lines(s))


@app.command("sufficiency", epilog=examples(
    "replab circuit sufficiency --task next_day --components L23H3,L29H1,L23H0",
    "replab circuit sufficiency --task sequences --components circuit.json --ablate-mlps --json"))
def sufficiency_cmd(components: str = COMPONENTS, task: str = TASK, dataset: str = DATASET,
                    classes: str = CLASSES, template: str = TEMPLATE, limit: int = LIMIT, metric: str = METRIC,
                    ablation: str = ABLATION, mean_over: str = MEAN_OVER, n_random: int = N_RANDOM,
                    ablate_mlps: bool = ABLATE_MLPS, seed: int = SEED, n_boot: int = N_BOOT, out: str = OUT,
                    model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Keep only the set (ablate every other head, and MLP with --ablate-mlps), with a random baseline."""
    from replab.circuits.validate_run import run_sufficiency

    s = run_sufficiency(components, task=task, out=out, model=model, dataset=dataset, classes=classes,
                        template=template, limit=limit, metric=metric, ablation=ablation, mean_over=mean_over,
                        n_random=n_random, seed=seed, n_boot=n_boot, ablate_mlps=ablate_mlps,
                        progress=not json_out)
    done(s, json_out, _lines(s))


@app.command("minimality", epilog=examples(
    "replab circuit minimality --task next_day --components L23H3,L29H1,L23H0",
    "replab circuit minimality --task sequences --components circuit.json --json"))
def minimality_cmd(components: str = COMPONENTS, task: str = TASK, dataset: str = DATASET,
                   classes: str = CLASSES, template: str = TEMPLATE, limit: int = LIMIT, metric: str = METRIC,
                   ablation: str = ABLATION, mean_over: str = MEAN_OVER, n_random: int = N_RANDOM,
                   ablate_mlps: bool = ABLATE_MLPS, seed: int = SEED, n_boot: int = N_BOOT, out: str = OUT,
                   model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """For each member: the set kept alone with and without it, against random members."""
    from replab.circuits.validate_run import run_minimality

    s = run_minimality(components, task=task, out=out, model=model, dataset=dataset, classes=classes,
                       template=template, limit=limit, metric=metric, ablation=ablation, mean_over=mean_over,
                       n_random=n_random, seed=seed, n_boot=n_boot, ablate_mlps=ablate_mlps,
                       progress=not json_out)
    done(s, json_out, _lines(s))


@app.command("replay", epilog=examples("replab circuit replay runs/circuit-necessity/config.yaml",
                                       "replab circuit replay runs/prune --out runs/prune-again --json"))
def replay_cmd(config: str = typer.Argument(..., help="A circuit run directory or its config.yaml."),
               out: str = typer.Option(None, "--out", "-o", help="Where to write (default: the same directory)."),
               json_out: bool = JSON_OPT) -> None:
    """Repeat a circuit run exactly from its config.yaml (same model, task, options and seeds)."""
    from replab.circuits.replay import replay_run

    s = replay_run(config, out=out, progress=not json_out)
    done(s, json_out, [f"replayed {s['config']['kind']}: {s['config']['command']}"])
