"""``replab features scan|patch``: where is a probe's direction used, and is it causally
sufficient there? (W3 step 6 of docs/workflows.md)

Only parses options into a config (:mod:`replab.features.config`) and prints; the work is
:func:`replab.features.scan.run_scan` and :func:`replab.features.direction_run.run_direction_patch`.
"""

from __future__ import annotations

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, N_BOOT_OPT, examples, human_console, print_json

app = typer.Typer(help="Feature-level patching: a layer scan, and direction patching with baselines "
                       "and a verdict.", no_args_is_help=True)

JSON_KEYS = ("effect", "ci_low", "ci_high", "of_full", "of_full_low", "of_full_high", "full_residual_effect",
             "random_mean", "random_p95", "percentile", "n_random", "complement_effect", "shuffled_effect",
             "verdict", "verdict_detail", "site", "layer", "hook", "positions", "metric", "clean_metric",
             "corrupt_metric", "ablation", "noising", "leace", "steering", "projection", "separation",
             "checks", "random_mean_ok", "bootstrap", "shuffled_source", "notes", "seconds", "out")
SCAN_KEYS = ("chosen_layer", "reason", "rule", "probe_best_layer", "probe_best_accuracy", "probe_best_full_effect",
             "chosen_full_effect", "chosen_direction_effect", "chosen_probe_accuracy", "max_full_layer",
             "max_direction_layer", "probe_kind", "class", "position_rule", "metric", "directions", "shuffled",
             "bootstrap", "separation", "table", "checks", "seconds", "out")


def _json_or_console(s: dict, keys, json_out: bool):
    """``--json``: print the summary's ``keys`` and return None; else a console for the human
    report, with the task's separation check already printed."""
    if json_out:
        print_json({k: s.get(k) for k in keys})
        return None
    console = human_console()
    console.print(s["separation"]["text"])
    return console


@app.command("scan", epilog=examples(
    "replab features scan --probe runs/demo/probe_superclass --task superclass --classes artist,scientist "
    "--out runs/demo/w3/scan",
    "replab features scan --probe runs/superset_probe_superclass --kind meandiff --class artist "
    "--layers 0-23 --random 10 --json"))
def scan_cmd(
        probe: str = typer.Option(..., "--probe", "-p", help="A probe run directory (replab probe train --out)."),
        kind: str = typer.Option("logistic", "--kind", help="Which probe of the run: logistic | meandiff."),
        cls: str = typer.Option(None, "--class", help="Class whose probe direction is patched (default: the "
                                                        "task's clean class, e.g. artist)."),
        task: str = typer.Option("superclass", "--task", "-t", help="superclass, or a patching task."),
        classes: str = typer.Option(None, "--classes", help="Super-classes A,B (clean, corrupt)."),
        dataset: str = typer.Option(None, "--dataset", help="Prompt file (superset schema for superclass)."),
        template: str = typer.Option(None, "--template", help="Keep one template."),
        pairs: int = typer.Option(64, "--pairs", help="At most this many prompt pairs."),
        positions: str = typer.Option(None, "--positions", help="Position rule (default: the probe's, "
                                                                  "e.g. entity_last)."),
        layers: str = typer.Option(None, "--layers", help="Layers to scan (default: every probe layer)."),
        metric: str = typer.Option(None, "--metric", help="class_mass (superclass default) | logit_diff | ..."),
        n_random: int = typer.Option(0, "--random", help="Random directions per layer (a band in the figure)."),
        min_full: float = typer.Option(0.5, "--min-full", help="A layer is eligible when its full-residual patch "
                                                               "restores at least this much."),
        seed: int = typer.Option(0, "--seed"),
        n_boot: int = N_BOOT_OPT,
        out: str = typer.Option(None, "--out", "-o", help="Run directory (default runs/features-scan)."),
        model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Per layer, in one batched run: the full-residual patch at the probe's position, the probe
    direction's patch, and the probe's accuracy; choose the layer to test (documented rule)."""
    from replab.features.config import ScanConfig, ScanRunConfig
    from replab.features.scan import run_scan

    config = ScanRunConfig(probe=probe, task=task, classes=classes, pairs=pairs, template=template, dataset=dataset,
                           scan=ScanConfig(kind=kind, cls=cls, positions=positions, layers=layers, metric=metric,
                                           n_random=n_random, min_full=min_full, seed=seed, n_boot=n_boot))
    s = run_scan(config=config, out=out, model=model, progress=not json_out)
    console = _json_or_console(s, SCAN_KEYS, json_out)
    if console is None:
        return
    from rich.table import Table

    t = Table(title=f"{s['class']} {s['probe_kind']} probe at {s['position_rule']} ({s['metric']}; {s['directions']})")
    for c in ("layer", "probe acc", "full patch", "direction", "of full", "shuffled"):
        t.add_column(c, justify="right")
    f2 = lambda v: f"{v:.2f}".replace("-0.00", "0.00")  # noqa: E731
    for r in s["table"]:
        mark = " *" if r["chosen"] else ""
        t.add_row(f"{r['layer']}{mark}", f"{r['probe_accuracy']:.3f}",
                  f"{f2(r['full_effect'])} [{f2(r['full_ci_low'])},{f2(r['full_ci_high'])}]",
                  f"{f2(r['direction_effect'])} [{f2(r['ci_low'])},{f2(r['ci_high'])}]",
                  f"{r['direction_of_full']:.0%}" if r["full_effect"] > 0.05 else "-",
                  "-" if r["shuffled_effect"] is None else f2(r["shuffled_effect"]))
    console.print(t)
    console.print(f"[bold]chosen layer: {s['chosen_layer']}[/bold] ({s['reason']})")
    console.print(f"rule: {s['rule']}; CIs resample {s['bootstrap']}; {s['n_variants']} patched runs in "
                  f"{s['seconds']:.1f} s")
    console.print(f"wrote {s['out']}/ (scan.parquet, scan.csv, scan.png)")


@app.command("patch", epilog=examples(
    "replab features patch --direction runs/demo/probe_superclass --class artist --layer runs/demo/w3/scan "
    "--task superclass --classes artist,scientist --out runs/features/artist_scan",
    "replab features patch --direction runs/demo/probe_superclass/directions/logistic_L20_artist.json "
    "--task superclass --classes artist,scientist --json --out runs/features/artist_L20",
    "replab features patch --direction runs/demo/probe_superclass/probes/meandiff.json --class artist "
    "--layer 15 --random 100 --alphas=-8,-4,0,4,8 --alpha-unit raw --out runs/features/artist_L15",
    "replab features patch --direction runs/demo/superset_known --class artist-scientist --layer 15 "
    "--positions entity_last --out runs/features/meandiff_L15",
    "replab features patch --direction my_vec.npy --site resid_pre --layer 6 --task next_day "
    "--positions last --metric logit_diff --out runs/features/next_day"))
def patch_cmd(
        direction: str = typer.Option(..., "--direction", "-d",
                                      help="A Direction artifact (.json/.safetensors), a probe run dir (its "
                                           "Direction artifact for --class at --layer), a probe artifact "
                                           "(probes/<kind>.json), an activation store dir, "
                                           "or a raw .npy/.safetensors vector [d] or basis [k, d]."),
        kind: str = typer.Option("logistic", "--kind", help="Probe of a probe run dir: logistic | meandiff."),
        cls: str = typer.Option(None, "--class",
                                help="Class of a probe/store direction: artist (vs the rest) or "
                                     "artist-scientist (a difference)."),
        label: str = typer.Option("superclass", "--label", help="Label column of a store/probe."),
        layer: str = typer.Option(None, "--layer",
                                  help="Layer number, or a `features scan` run dir (its chosen layer); "
                                       "default: the direction's own (a probe's: its most accurate layer)."),
        site: str = typer.Option(None, "--site",
                                 help="resid_pre|resid_mid|resid_post|attn_out|mlp_out (default: the "
                                      "direction's hook)."),
        positions: str = typer.Option(None, "--positions",
                                      help="entity_last | name_first | last | all | comma list of "
                                           "positions (default: the direction's position rule; an unknown "
                                           "rule is an error; raw vectors: last)."),
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
        alphas: str = typer.Option("-2,-1,0,1,2", "--alphas", help="Steering coefficients, comma list "
                                                                   "(write --alphas=-2,-1,... )."),
        alpha_unit: str = typer.Option("gap", "--alpha-unit",
                                       help="gap: α × the mean clean−corrupt projection (α = 1 moves a "
                                            "corrupt prompt by the class gap); raw: add α · unit direction."),
        shuffled: str = typer.Option(None, "--shuffled",
                                     help="Shuffled-label baseline: a direction file, or a store (labels "
                                          "permuted). Default: the probe run's shuffled-label probe, else "
                                          "the direction's own store with permuted labels."),
        store: str = typer.Option(None, "--store", help="Store for LEACE (default: the direction's own)."),
        leace: bool = typer.Option(True, "--leace/--no-leace", help="LEACE erasure as a necessity check."),
        random_tol: float = typer.Option(None, "--random-tol",
                                         help="Random-mean sanity check: stop when |random mean| > "
                                              "max(this, 10% of the full effect) (default 0.05)."),
        seed: int = typer.Option(0, "--seed", help="Seed for random directions, shuffles, bootstrap."),
        n_boot: int = N_BOOT_OPT,
        out: str = typer.Option(None, "--out", "-o", help="Run directory."),
        model: str = MODEL_OPT, json_out: bool = JSON_OPT) -> None:
    """Patch only a direction clean→corrupt (and noise, ablate, steer), against random, complement
    and shuffled-label baselines; print the verdict with the numbers that drive it."""
    from replab.features.config import DirectionPatchConfig, DirectionRunConfig
    from replab.features.direction_run import run_direction_patch

    config = DirectionRunConfig(
        direction=direction, cls=cls, label=label, layer=layer, kind=kind, shuffled=shuffled, store=store,
        leace=leace, task=task, classes=classes, pairs=pairs, template=template, dataset=dataset,
        patch=DirectionPatchConfig(site=site, positions=positions, metric=metric, n_random=n_random, alphas=alphas,
                                   alpha_unit=alpha_unit, random_tol=random_tol, seed=seed, n_boot=n_boot))
    s = run_direction_patch(config=config, out=out, model=model, progress=not json_out)
    console = _json_or_console(s, JSON_KEYS, json_out)
    if console is None:
        return
    console.print(f"{s['hook']} at {s['position_label']}, metric {s['metric']}: clean {s['clean_metric']:.3f}, "
                  f"corrupt {s['corrupt_metric']:.3f}; {s['n_variants']} patched runs in {s['seconds']:.1f} s")
    console.print(f"[bold]{s['verdict']}[/bold]")
    for line in s["verdict_detail"][1:]:
        console.print(f"  {line}")
    steer = ", ".join(f"α={r['alpha']:g}: {r['normalized_effect']:+.2f}" for r in s["steering"])
    console.print(f"  steering (normalised effect): {steer}; clean-vs-corrupt projection gap "
                  f"{s['projection']['gap']:.2f}")
    checks = ", ".join(f"{k} {v['value']:.4f}".replace("-0.0000", "0.0000") for k, v in s["checks"].items())
    console.print(f"sanity checks passed: {checks}; CIs resample {s['bootstrap']}")
    for note in s["notes"]:
        console.print(f"note: {note}")
    console.print(f"wrote {s['out']}/")
