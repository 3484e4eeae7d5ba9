"""The feature stages of ``replab run superset`` (W3 step 6): the rank of the super-class code,
direction patching, an SAE at the candidate layer (trained once, cached), its decomposition of
the direction and latent patching, each one call of :mod:`replab.probes` or :mod:`replab.features`."""

from __future__ import annotations

import shlex
from pathlib import Path

from replab._figures import pyplot, save
from replab.experiments.spec import model_flag, png_figures, rel
from replab.experiments.superset_common import (
    candidate_layer,
    clean_class,
    stage_file,
    task_flags,
    task_options,
)
from replab.features.config import DirectionPatchConfig, DirectionRunConfig, LatentPatchConfig, LatentRunConfig
from replab.features.direction_run import run_direction_patch
from replab.features.latent_run import run_latent_patch
from replab.features.sae import SAETrainConfig, cached_sae_dir, run_decompose, run_sae_eval, train_sae
from replab.hooks import hook_name
from replab.probes import ProbeConfig, parse_ranks, train_probes


def rank(ctx) -> dict:
    """W3 step 6: rank-k probes of the super-class at the candidate layer against the full-rank
    one, and (for rank > 1) the clustering of the class directions."""
    c, L = ctx.config, candidate_layer(ctx)
    store = stage_file(ctx, "harvest", "store")
    ranks = parse_ranks(c["ranks"])
    cfg = ProbeConfig(label="superclass", layers=str(L), kinds=("logistic",), ranks=ranks, folds=c["probe_folds"],
                      controls=False, erase=False, seed=c["seed"])
    run = train_probes(store, config=cfg, out=ctx.out, progress=ctx.progress)
    ans = run.summary["rank"]["layers"][L]
    fig = _rank_figure(ans, L, ctx.out / "rank")
    merges = ans.get("dendrogram", {}).get("merges", [])
    return {"layer": L, "full": ans["full"], "smallest_rank": ans["smallest_rank"], "epsilon": cfg.epsilon,
            "max_rank": max(ranks), "rank1": ans["accuracy_by_rank"].get(1),
            "accuracy_by_rank": [{"rank": int(k), "balanced_accuracy": v} for k, v in ans["accuracy_by_rank"].items()],
            "n_clusters": ans.get("n_clusters"), "chance_distance": ans.get("chance_distance"),
            "clusters": [{"class": k, "cluster": v} for k, v in (ans.get("clusters") or {}).items()],
            "first_merge": (" + ".join(merges[0]["a"] + merges[0]["b"]) if merges else None),
            "first_merge_distance": merges[0]["distance"] if merges else None,
            "figures": [rel(fig, ctx.run_dir)],
            "command": (f"replab probe train --store {shlex.quote(str(store))} --label superclass --layers {L} "
                        f"--kind logistic --rank {c['ranks']} --folds {c['probe_folds']} --no-controls --no-erase "
                        f"--seed {c['seed']} --out {ctx.out}")}


def _rank_figure(ans: dict, layer: int, stem: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ks = sorted(ans["accuracy_by_rank"])
    ax.plot(ks, [ans["accuracy_by_rank"][k] for k in ks], "-o", label="rank-k probe")
    ax.axhline(ans["full"], color="black", ls="--", lw=1, label="full-rank logistic probe")
    ax.set_xticks(ks)
    ax.set_xlabel("probe rank k")
    ax.set_ylabel("balanced accuracy (grouped CV)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"super-class probes of rank k at layer {layer}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, stem, formats=("png", "svg"))[0]


def direction(ctx) -> dict:
    """W3 step 6: the probe's direction for the clean class at the candidate layer patched clean →
    corrupt, against random directions, its complement and the shuffled-label probe; the verdict."""
    c, L = ctx.config, candidate_layer(ctx)
    probe_dir = ctx.run_dir.resolve() / "probe"
    cfg = DirectionRunConfig(direction=str(probe_dir), cls=clean_class(c), layer=L, **task_options(ctx),
                             patch=DirectionPatchConfig(n_random=c["n_random"], seed=c["seed"], n_boot=c["n_boot"]))
    s = run_direction_patch(config=cfg, out=ctx.out, model=ctx.model, progress=ctx.progress)
    verdict = s["verdict"].split(":")[0]
    return {"layer": L, "class": clean_class(c), "verdict": verdict, "verdict_text": s["verdict"],
            **{k: s[k] for k in ("effect", "ci_low", "ci_high", "of_full", "of_full_low", "of_full_high",
                                 "full_residual_effect", "random_mean", "random_p95", "n_random", "percentile",
                                 "complement_of_full", "shuffled_of_full", "clean_metric", "corrupt_metric")},
            "n_random_below": int(round(s["percentile"] / 100 * s["n_random"])),
            "ablation_drop": s["ablation"]["drop"], "leace_drop": (s["leace"] or {}).get("drop"),
            "direction_file": rel(ctx.out / "direction.json", ctx.run_dir),
            "figures": png_figures(ctx, s["files"]),
            "command": (f"replab features patch{model_flag(ctx)} --direction {probe_dir} --class {clean_class(c)} "
                        f"--layer {L} {task_flags(ctx)} --random {c['n_random']} --seed {c['seed']} "
                        f"--n-boot {c['n_boot']} --out {ctx.out}")}


def _sae_config(c: dict, layer: int) -> SAETrainConfig:
    return SAETrainConfig(layer=layer, hook="resid_post", arch="topk", d_sae=c["sae_d_sae"], k=c["sae_k"],
                          tokens=c["sae_tokens"], corpus_tokens=c["sae_corpus_tokens"], seed=c["seed"],
                          threads=c["threads"])


def sae_train(ctx) -> dict:
    """An SAE on the candidate layer's residual stream, trained once per model and config and
    cached next to the per-model SAE cache (never replacing ``replab sae train``'s own entry)."""
    c, L = ctx.config, candidate_layer(ctx)
    cfg = _sae_config(c, L)
    out = cached_sae_dir(ctx.model.replab_identity.to_dict(), hook_name("resid_post", L), cfg)
    path, st = train_sae(ctx.model, cfg, out=out, progress=ctx.progress)
    # trained here or found in the cache is not a result (a replay would differ): the SAE and its
    # training statistics, recorded when it was trained, are the same either way
    return {"sae_path": str(path), "layer": L, "d_sae": cfg.d_sae, "k": cfg.k,
            "arch": cfg.arch, "tokens_trained": st["tokens_trained"], "corpus_tokens": st["corpus_tokens"],
            "epochs": st["epochs"], "train_fvu_last": st["train_fvu_last"], "train_seconds": st["seconds"],
            "train_cpu_seconds": st["cpu_seconds"],
            "command": (f"replab sae train{model_flag(ctx)} --layer {L} --arch topk --d-sae {cfg.d_sae} --k {cfg.k:g} "
                        f"--tokens {cfg.tokens} --corpus-tokens {cfg.corpus_tokens} --seed {cfg.seed}"
                        + (f" --threads {cfg.threads}" if cfg.threads else "") + f" --out {out}")}


def sae_eval(ctx) -> dict:
    """The SAE on held-out text: explained variance, L0, CE loss recovered (and the SAELens
    cross-check on ``sae_lens_tokens`` tokens)."""
    c, sae = ctx.config, ctx.results["sae_train"]["sae_path"]
    s, _ = run_sae_eval(sae, ctx.model, "builtin-heldout", c["sae_eval_tokens"], out=ctx.out,
                        progress=ctx.progress, sae_lens_tokens=c["sae_lens_tokens"])
    m = s["metrics"]
    cross = s.get("sae_lens_crosscheck")
    return {"tokens": m["tokens"], "l0": m["l0"], "fvu": m["fvu"], "explained_variance": 1 - m["fvu"],
            "ce_loss_recovered": m["ce_loss_recovered"], "delta_ce": m["delta_ce"], "ce_clean": m["ce_clean"],
            "ce_sae": m["ce_sae"], "ce_zero": m["ce_zero"], "kl": m["kl_sae"], "dead_latents": m["dead_latents"],
            "frac_dead": m["frac_dead"], "dense_latents": m["dense_latents"],
            "sae_lens_max_rel_diff": cross["max_rel_diff"] if cross else None,
            "figures": [rel(ctx.out / "latent_frequency.png", ctx.run_dir)],
            "command": (f"replab sae eval {shlex.quote(sae)}{model_flag(ctx)} --tokens {c['sae_eval_tokens']} "
                        f"--sae-lens {c['sae_lens_tokens']} --out {ctx.out}")}


def sae_decompose(ctx) -> dict:
    """The patched direction onto the SAE's latents: cosines and class attribution from the store."""
    c = ctx.config
    sae, d = ctx.results["sae_train"]["sae_path"], stage_file(ctx, "direction", "direction_file")
    store = stage_file(ctx, "harvest", "store")
    s = run_decompose(sae, str(d), str(store), "superclass", clean_class(c), top=c["latent_top"], out=ctx.out,
                      model=ctx.model)
    cols = ("rank", "latent", "cosine", "contribution", "example_tokens")
    top = [{k: r[k] for k in cols if k in r} for r in s["top"]]
    return {"n_top": len(top), "top": top, "reconstructed_fraction": s.get("reconstructed_fraction"),
            "max_cosine": max(abs(r["cosine"]) for r in s["top"]),
            "latents": [int(r["latent"]) for r in s["top"]],
            "figures": [rel(ctx.out / "top_latents.png", ctx.run_dir)],
            "command": (f"replab sae decompose {shlex.quote(sae)}{model_flag(ctx)} --direction {d} --store {store} "
                        f"--label superclass --class {clean_class(c)} --top {c['latent_top']} --out {ctx.out}")}


def latents(ctx) -> dict:
    """The decomposition's top latents patched clean → corrupt (error term kept) against random
    sets of active latents; the verdict."""
    c, sae = ctx.config, ctx.results["sae_train"]["sae_path"]
    src = ctx.run_dir.resolve() / "sae_decompose"
    cfg = LatentRunConfig(sae=sae, from_dir=str(src), **task_options(ctx), patch=LatentPatchConfig(
        top=c["latent_top"], n_random=c["latent_random"], seed=c["seed"], n_boot=c["n_boot"]))
    s = run_latent_patch(config=cfg, out=ctx.out, model=ctx.model, progress=ctx.progress)
    return {"verdict": s["verdict"].split(":")[0], "verdict_text": s["verdict"], "latents": s["latents"],
            "n_latents": len(s["latents"]),
            **{k: s[k] for k in ("effect", "ci_low", "ci_high", "of_full", "of_full_low", "of_full_high",
                                 "full_residual_effect", "random_mean", "random_p95", "n_random", "percentile",
                                 "all_latents_effect", "error_term_effect")},
            "n_random_below": int(round(s["percentile"] / 100 * s["n_random"])) if s["n_random"] else 0,
            "top_k": [{k: r[k] for k in ("k", "normalized_effect", "of_full")} for r in s["top_k"]],
            "figures": png_figures(ctx, s.get("files", [])),
            "command": (f"replab sae patch {shlex.quote(sae)}{model_flag(ctx)} --from {src} --top {c['latent_top']} "
                        f"{task_flags(ctx)} --random {c['latent_random']} --seed {c['seed']} --n-boot {c['n_boot']} "
                        f"--out {ctx.out}")}
