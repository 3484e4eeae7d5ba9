"""``replab sae patch``: patch chosen SAE latents clean → corrupt (error term kept), with baselines.

Registered on the ``replab sae`` group (see :mod:`replab.cli.sae`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, N_BOOT_OPT, examples, human_console, print_json
from replab.cli.sae import HOOK_OPT, LAYER_OPT, SAE_DIR_ARG, app


@app.command("patch", epilog=examples(
    "replab sae patch --layer 15 --task superclass --classes artist,scientist --top 5",
    "replab sae patch --layer 20 --from runs/demo/w3/decompose --top 5 --json",
    "replab sae patch --layer 20 --dataset runs/demo/superset_known.jsonl --metric logprob --top 10",
    "replab sae patch runs/sae-l15 --task next_day --latents 12,345 --positions all"))
def patch_cmd(sae_dir: Path = SAE_DIR_ARG, layer: int = LAYER_OPT, hook: str = HOOK_OPT,
              task: str = typer.Option("superclass", "--task", "-t",
                                       help="superclass (with --classes), next_day, or a pairs file."),
              classes: str = typer.Option(None, "--classes", help="Super-class task: CLEAN,CORRUPT classes."),
              latents: str = typer.Option(None, "--latents", help="Latent ids, e.g. 12,345."),
              from_dir: Path = typer.Option(None, "--from", help="A `sae decompose` run: its top latents."),
              top: int = typer.Option(5, "--top", help="How many latents (from --from, or by attribution)."),
              positions: str = typer.Option(None, "--positions",
                                            help="entity_last (super-class default), last, all, or 3,4."),
              metric: str = typer.Option(None, "--metric",
                                         help="class_mass (superclass default) | logit_diff | margin | logprob | "
                                              "prob | kl."),
              dataset: str = typer.Option(None, "--dataset",
                                          help="Prompt file (superset schema for --task superclass, e.g. a "
                                               "known-only JSONL)."),
              n_random: int = typer.Option(100, "--random", help="Random same-size latent sets."),
              pairs: int = typer.Option(64, "--pairs", help="At most this many prompt pairs."),
              template: str = typer.Option(None, "--template", help="One template of the task."),
              seed: int = typer.Option(0, "--seed"), n_boot: int = N_BOOT_OPT,
              out: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/sae-patch)."),
              model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Do a few SAE latents carry the effect? Patch them, compare to the full patch and random sets.

    Same verdict rule and JSON keys as `replab features patch`: effect, ci_low, ci_high, of_full,
    of_full_low, of_full_high, full_residual_effect, random_mean, random_p95, percentile, verdict,
    verdict_detail, plus latents, all_latents_effect, error_term_effect, complement_effect, checks.
    """
    from replab.features.config import LatentPatchConfig, LatentRunConfig
    from replab.features.latent_run import run_latent_patch

    config = LatentRunConfig(sae=sae_dir, layer=layer, hook=hook, from_dir=from_dir, task=task, classes=classes,
                             pairs=pairs, template=template, dataset=dataset,
                             patch=LatentPatchConfig(latents=latents, top=top, positions=positions, metric=metric,
                                                     n_random=n_random, seed=seed, n_boot=n_boot))
    s = run_latent_patch(config=config, out=out, model=model)
    if json_out:
        print_json(s)
        return

    console = human_console()
    console.print(f"latents {s['latents']} at {s['hook_name']} (positions {s['position_rule']}), "
                  f"task {s['task']['name']}, metric {s['metric']}")
    console.print(f"[bold]{s['verdict']}[/bold]")
    for line in s["verdict_detail"][1:]:
        console.print(f"  {line}")
    checks = ", ".join(f"{k} {v['value']:.4f}".replace("-0.0000", "0.0000") for k, v in s["checks"].items())
    console.print(f"sanity checks passed: {checks}; CIs resample {s['bootstrap']}")
    console.print(f"wrote {s['out']}/")
