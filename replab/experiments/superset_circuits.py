"""The circuit stages of ``replab run superset`` (W3 steps 1-5): block sweeps at the candidate
layer, backup heads, path patching into the top head and the generalisation grid, each one call
of :mod:`replab.circuits` writing its run directory."""

from __future__ import annotations

from replab.circuits.blocks_run import run_blocks, run_grid, run_hydra
from replab.circuits.path_run import run_path
from replab.errors import ReplabError
from replab.experiments.spec import model_flag, png_figures
from replab.experiments.superset_common import candidate_layer, task_flags, task_options


def _task(ctx) -> dict:
    """The keyword arguments of the circuit runs: the known-item super-class task, class mass."""
    c = ctx.config
    return dict(task="superclass", model=ctx.model, dataset=task_options(ctx)["dataset"], classes=c["classes"],
                limit=c["pairs"], metric="class_mass", seed=c["seed"], n_boot=c["n_boot"], progress=ctx.progress)


def _flags(ctx) -> str:
    c = ctx.config
    return f"{task_flags(ctx, '--limit')} --metric class_mass --seed {c['seed']} --n-boot {c['n_boot']}"


def blocks(ctx) -> dict:
    """W3 steps 1-2: necessity and sufficiency of the residual stream, each head and the MLP at the
    candidate layer; the top head (the most necessary) is what the next stages follow."""
    c, L = ctx.config, candidate_layer(ctx)
    s = run_blocks(L, out=ctx.out, ablation=c["blocks_ablation"], positions=c["blocks_positions"], **_task(ctx))
    recs = [{k: r[k] for k in ("block", "test", "metric_before", "metric_after", "normalized_effect", "ci_low",
                               "ci_high", "answer_logit", "foil_logit", "max_other_logit")} for r in s["records"]]
    nec = {r["block"]: r for r in recs if r["test"] == "necessity"}
    suf = {r["block"]: r for r in recs if r["test"] == "sufficiency"}
    heads = [b for b in nec if b.startswith("H")]
    top = min(heads, key=lambda b: (nec[b]["normalized_effect"], -suf[b]["normalized_effect"]))
    best_suf = max(heads, key=lambda b: suf[b]["normalized_effect"])
    return {"layer": L, "clean_metric": s["clean_metric"], "corrupt_metric": s["corrupt_metric"],
            "top_head": f"L{L}{top}", "top_head_necessity": nec[top]["normalized_effect"],
            "top_head_necessity_ci": [nec[top]["ci_low"], nec[top]["ci_high"]],
            "top_head_sufficiency": suf[top]["normalized_effect"],
            "best_sufficient_head": f"L{L}{best_suf}", "best_head_sufficiency": suf[best_suf]["normalized_effect"],
            "resid_necessity": nec["RESID"]["normalized_effect"],
            "resid_sufficiency": suf["RESID"]["normalized_effect"],
            "mlp_necessity": nec["MLP"]["normalized_effect"], "mlp_sufficiency": suf["MLP"]["normalized_effect"],
            "n_sufficient_blocks": sum(r["normalized_effect"] >= 0.5 for b, r in suf.items() if b != "RESID"),
            "records": recs, "figures": png_figures(ctx, s["files"]),
            "command": (f"replab circuit blocks{model_flag(ctx)} --layer {L} {_flags(ctx)} --ablation "
                        f"{c['blocks_ablation']} --positions {c['blocks_positions']} --out {ctx.out}")}


def hydra(ctx) -> dict:
    """W3 step 3: ablate the top head and rank every other head by the rise of its direct effect."""
    c, top = ctx.config, ctx.results["blocks"]["top_head"]
    s = run_hydra(top, out=ctx.out, ablation=c["hydra_ablation"], **_task(ctx))
    first = s["top"][0]
    return {"ablate": top, "ablation": c["hydra_ablation"], "clean_metric": s["clean_metric"],
            "ablated_metric": s["ablated_metric"],
            "normalized_effect": s["normalized_effect"], "lost_direct_effect": s["lost_direct_effect"],
            "n_backups": len(s["backups"]), "backups": [b["head"] for b in s["backups"]],
            "top_compensating": first["head"], "top_compensation": first["compensation"],
            "top_fraction_of_lost": first["fraction_of_lost"], "min_fraction": s["min_fraction"],
            "top": [{k: r[k] for k in ("head", "dla_clean", "dla_ablated", "compensation", "fraction_of_lost")}
                    for r in s["top"][:6]],
            "figures": png_figures(ctx, s["files"]),
            "command": (f"replab circuit hydra{model_flag(ctx)} --ablate {top} {_flags(ctx)} "
                        f"--ablation {c['hydra_ablation']} --out {ctx.out}")}


def path(ctx) -> dict:
    """W3 step 4: path patching from each earlier head into the top head's input, then ablating
    only the strongest path to confirm it."""
    c, top = ctx.config, ctx.results["blocks"]["top_head"]
    receiver = f"{top}.{c['path_receiver']}"
    common = _task(ctx)
    layer, n = int(top[1:].split("H")[0]), c["path_sender_layers"]
    if layer == 0:
        raise ReplabError(f"{top} is in layer 0: no head sits below it to path-patch from")
    first = 0 if n is None else max(0, layer - int(n))
    senders = "all" if n is None else ",".join(
        f"L{lay}H{h}" for lay in range(first, layer) for h in range(ctx.model.cfg.n_heads))
    s = run_path(senders, receiver, out=ctx.out / "senders", each=True, **common)
    recs = sorted(s["records"], key=lambda r: r["normalized_effect"])
    best = recs[0]
    sender = "+".join(best["sender"])
    conf = run_path(sender, receiver, out=ctx.out / "confirm", ablation=c["path_confirm_ablation"], **common)
    cr = conf["records"][0]
    flags = _flags(ctx)
    return {"receiver": s["receiver"], "n_senders": s["n_sender_sets"], "first_sender_layer": first,
            "last_sender_layer": layer - 1, "top_sender": sender,
            "top_effect": best["normalized_effect"], "top_ci": [best["ci_low"], best["ci_high"]],
            "top_drop": best["drop"],
            "next": [{"sender": "+".join(r["sender"]), "normalized_effect": r["normalized_effect"], "drop": r["drop"]}
                     for r in recs[:5]],
            "n_paths_over_5pct": sum(r["drop"] > 0.05 for r in recs),
            "confirm_ablation": c["path_confirm_ablation"], "confirm_effect": cr["normalized_effect"],
            "confirm_ci": [cr["ci_low"], cr["ci_high"]], "confirm_drop": cr["drop"],
            "note": s.get("note"), "figures": png_figures(ctx, s["files"]),
            "command": (f"replab circuit path{model_flag(ctx)} --sender {senders} --each --receiver {receiver} "
                        f"{flags} "
                        f"--out {ctx.out / 'senders'} && replab circuit path{model_flag(ctx)} --sender {sender} "
                        f"--receiver {receiver} --ablation {c['path_confirm_ablation']} {flags} "
                        f"--out {ctx.out / 'confirm'}")}


def grid(ctx) -> dict:
    """W3 step 5: the block sweep over every ordered pair of ``grid_classes`` on the builtin set
    (whose invented and ambiguous people are the negative controls), pooled per clean class."""
    c, L, top = ctx.config, candidate_layer(ctx), ctx.results["blocks"]["top_head"]
    s = run_grid("blocks", "superclass", layer=L, out=ctx.out, model=ctx.model, classes=c["grid_classes"],
                 pairs=c["grid_pairs"], controls=c["grid_controls"], metric="class_mass",
                 ablation=c["blocks_ablation"], positions=c["blocks_positions"], seed=c["seed"],
                 n_boot=c["n_boot"], progress=ctx.progress)
    block = top.removeprefix(f"L{L}")
    keep = ("RESID", "MLP", block)
    by_class = [{"class": r["class"], "block": r["block"], "test": r["test"], "n_prompts": r["n_prompts"],
                 "normalized_effect": r["normalized_effect"]} for r in s["by_class"] if r["block"] in keep]
    head_nec = {r["class"]: r["normalized_effect"] for r in by_class
                if r["block"] == block and r["test"] == "necessity"}
    ctrl = [r for r in s["controls"] if r["block"] in keep]
    judged = [r for r in s["controls"] if r["silent"] != "n/a"]
    return {"layer": L, "n_tasks": s["n_tasks"], "n_pairs": s["n_prompts"], "n_classes": len(s["classes"]),
            "classes": s["classes"], "n_answer_words": s["n_answer_words"], "top_block": block, "top_head": top,
            "silent_fraction": s["silent_fraction"],
            "head_necessity_min": min(head_nec.values()), "head_necessity_max": max(head_nec.values()),
            "head_necessity_min_class": min(head_nec, key=head_nec.get),
            "head_necessity_max_class": max(head_nec, key=head_nec.get),
            "n_control_cells": len(judged), "n_silent": sum(r["silent"] == "yes" for r in judged),
            "by_class": by_class,
            "controls": [{k: r[k] for k in ("class", "block", "test", "control_change", "real_change", "silent")}
                         for r in ctrl],
            "figures": png_figures(ctx, s["files"]),
            "command": (f"replab circuit grid{model_flag(ctx)} --task superclass --classes {c['grid_classes']} "
                        f"--layer {L} --pairs {c['grid_pairs']} "
                        f"{'--controls' if c['grid_controls'] else '--no-controls'} "
                        f"--metric class_mass --ablation {c['blocks_ablation']} --positions {c['blocks_positions']} "
                        f"--seed {c['seed']} --n-boot {c['n_boot']} --out {ctx.out}")}
