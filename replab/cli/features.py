"""``replab features patch``: is a probe's direction causally sufficient? (W3 step 6)

Only parses options and prints; the work is :func:`replab.features.direction_run.run_direction_patch`.
"""

from __future__ import annotations

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, print_json

app = typer.Typer(help="Feature-level patching: direction patching with baselines and a verdict.",
                  no_args_is_help=True)

JSON_KEYS = ("effect", "ci_low", "ci_high", "of_full", "of_full_low", "of_full_high", "full_residual_effect",
             "random_mean", "random_p95", "percentile", "n_random", "complement_effect", "shuffled_effect",
             "verdict", "verdict_detail", "site", "layer", "hook", "positions", "metric", "clean_metric",
             "corrupt_metric", "ablation", "noising", "leace", "steering", "projection", "separation",
             "checks", "random_mean_ok", "notes", "seconds", "out")


@app.command("patch", epilog=examples(
    "replab features patch --direction runs/demo/probe_superclass/directions/meandiff_L29_artist.json "
    "--task superclass --classes artist,scientist --out runs/features/artist_L29",
    "replab features patch --direction runs/demo/probe_superclass/probes/meandiff.json --class artist "
    "--layer 15 --random 100 --alphas=-2,-1,0,1,2 --alpha-unit gap --json --out runs/features/artist_L15",
    "replab features patch --direction runs/demo/superset_known --class artist-scientist --layer 15 "
    "--positions entity_last --out runs/features/meandiff_L15",
    "replab features patch --direction my_vec.npy --site resid_pre --layer 6 --task next_day "
    "--positions last --metric logit_diff --out runs/features/next_day"))
def patch_cmd(
        direction: str = typer.Option(..., "--direction", "-d",
                                      help="A Direction artifact (.json/.safetensors), a probe artifact "
                                           "(probes/<kind>.json) or probe run dir, an activation store dir, "
                                           "or a raw .npy/.safetensors vector [d] or basis [k, d]."),
        cls: str = typer.Option(None, "--class",
                                help="Class of a probe/store direction: artist (vs the rest) or "
                                     "artist-scientist (a difference)."),
        label: str = typer.Option("superclass", "--label", help="Label column of a store/probe."),
        layer: int = typer.Option(None, "--layer", help="Layer (default: the direction's own)."),
        site: str = typer.Option(None, "--site",
                                 help="resid_pre|resid_mid|resid_post|attn_out|mlp_out (default: the "
                                      "direction's hook)."),
        positions: str = typer.Option(None, "--positions",
                                      help="entity_last | name_first | last | all | comma list of "
                                           "positions (default: the direction's position rule, else last)."),
        task: str = typer.Option("superclass", "--task", "-t",
                                 help="superclass, or a patching task / prompt set (next_day, ...)."),
        classes: str = typer.Option(None, "--classes", help="Super-classes A,B (clean, corrupt), "
                                                              "default artist,scientist."),
        dataset: str = typer.Option(None, "--dataset",
                                    help="Prompt file (superset schema for --task superclass, e.g. a "
                                         "known-only JSONL)."),
        template: str = typer.Option(None, "--template", help="Keep one template."),
        pairs: int = typer.Option(64, "--pairs", help="At most this many prompt pairs."),
        metric: str = typer.Option(None, "--metric",
                                   help="class_mass (superclass default) | logit_diff | margin | logprob | "
                                        "prob | kl"),
        n_random: int = typer.Option(100, "--random", help="Random directions (same rank) as a baseline."),
        alphas: str = typer.Option("-8,-4,0,4,8", "--alphas", help="Steering coefficients, comma list "
                                                                   "(write --alphas=-8,-4,... )."),
        alpha_unit: str = typer.Option("raw", "--alpha-unit",
                                       help="raw: add α · unit direction; gap: α × the mean clean−corrupt "
                                            "projection (α = 1 moves by the class gap)."),
        shuffled: str = typer.Option(None, "--shuffled",
                                     help="Shuffled-label baseline: a direction file, or a store (labels "
                                          "permuted). Default: the direction's own store if present."),
        store: str = typer.Option(None, "--store", help="Store for LEACE (default: the direction's own)."),
        leace: bool = typer.Option(True, "--leace/--no-leace", help="LEACE erasure as a necessity check."),
        seed: int = typer.Option(0, "--seed", help="Seed for random directions, shuffles, bootstrap."),
        out: str = typer.Option(None, "--out", "-o", help="Run directory."),
        model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Patch only a direction clean→corrupt (and noise, ablate, steer), against random, complement
    and shuffled-label baselines; print the verdict with the numbers that drive it."""
    from replab.features.direction_run import run_direction_patch

    s = run_direction_patch(direction, out=out, task=task, classes=classes, cls=cls, label=label,
                            layer=layer, site=site, positions=positions, metric=metric, n_random=n_random,
                            alphas=alphas, alpha_unit=alpha_unit, shuffled=shuffled, store=store, leace=leace, template=template,
                            pairs=pairs, dataset=dataset, model=model, seed=seed, progress=not json_out)
    if json_out:
        print_json({k: s.get(k) for k in JSON_KEYS})
        return
    from rich.console import Console

    console = Console(highlight=False)
    console.print(s["separation"]["text"])
    console.print(f"{s['hook']} at {s['position_label']}, metric {s['metric']}: clean {s['clean_metric']:.3f}, "
                  f"corrupt {s['corrupt_metric']:.3f}; {s['n_variants']} patched runs in {s['seconds']:.1f} s")
    console.print(f"[bold]{s['verdict']}[/bold]")
    for line in s["verdict_detail"][1:]:
        console.print(f"  {line}")
    steer = ", ".join(f"α={r['alpha']:g}: {r['normalized_effect']:+.2f}" for r in s["steering"])
    console.print(f"  steering (normalised effect): {steer}; clean-vs-corrupt projection gap "
                  f"{s['projection']['gap']:.2f}")
    checks = ", ".join(f"{k} {v['value']:.4f}" for k, v in s["checks"].items())
    console.print(f"sanity checks passed: {checks}; random mean {s['random_mean']:+.3f}"
                  + ("" if s["random_mean_ok"] else " (not about 0: see random.parquet)"))
    for note in s["notes"]:
        console.print(f"note: {note}")
    console.print(f"wrote {s['out']}/")
