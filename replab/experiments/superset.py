"""``replab run superset`` (W3): is there an "artistness" direction, and is it causally sufficient?

Stages, each one library call (or two) writing its own run directory:

1. ``known_items``: score the ``superset`` prompt set, keep the items the model knows
   (:func:`replab.prompts.check_cache.check_dataset_cached`, :func:`replab.prompts.known_only`);
2. ``harvest``: the residual stream at each person's last name token, every layer
   (:func:`replab.harvesting.harvest`);
3. ``probe``: the super-class probe sweep over layers with controls
   (:func:`replab.probes.train_probes`);
4. ``scan``: the feature scan that chooses the candidate layer
   (:func:`replab.features.scan.run_scan`);
5. ``blocks``: necessity and sufficiency of the residual stream, each head and the MLP at that
   layer (:func:`replab.circuits.blocks_run.run_blocks`);
6. ``hydra``: backup heads after ablating the top head (:func:`~replab.circuits.blocks_run.run_hydra`);
7. ``path``: path patching from every earlier head into the top head's input, then ablating
   only the strongest path (:func:`replab.circuits.path_run.run_path`);
8. ``grid``: the block sweep over every ordered pair of five super-classes, split by class,
   with the invented / ambiguous people as negative controls
   (:func:`~replab.circuits.blocks_run.run_grid`);
9. ``rank``: rank-k probes at the chosen layer against the full-rank one, and the clustering
   of the class directions (:func:`replab.probes.train_probes` with ranks);
10. ``direction``: the probe direction patched clean → corrupt against random directions, the
    verdict (:func:`replab.features.direction_run.run_direction_patch`);
11. ``sae_train``: an SAE on the chosen layer (trained once, cached per model and config;
    :func:`replab.features.sae.train_sae`);
12. ``sae_eval``: its held-out explained variance, L0, CE loss recovered
    (:func:`replab.features.sae.run_sae_eval`);
13. ``sae_decompose``: the direction onto SAE latents (:func:`replab.features.sae.run_decompose`);
14. ``latents``: the top latents patched clean → corrupt, the verdict
    (:func:`replab.features.latent_run.run_latent_patch`).

The headline and the report's narrative are in :mod:`replab.experiments.superset_report`.
"""

from __future__ import annotations

import shlex

from replab.errors import ReplabError
from replab.experiments.spec import Experiment, Stage, model_flag, png_figures, rel
from replab.experiments.superset_circuits import blocks, grid, hydra, path
from replab.experiments.superset_common import (
    clean_class,
    limited,
    stage_file,
    task_flags,
    task_options,
)
from replab.experiments.superset_features import direction, latents, rank, sae_decompose, sae_eval, sae_train
from replab.experiments.superset_report import headline, narrative
from replab.features.config import ScanConfig, ScanRunConfig
from replab.features.scan import run_scan
from replab.harvesting import harvest
from replab.probes import ProbeConfig, train_probes
from replab.prompts import known_only, load_prompts
from replab.prompts.check_cache import check_dataset_cached

DEFAULTS = {
    "dataset": "superset",          # the prompt set (superset schema)
    "classes": "artist,scientist",  # clean, corrupt super-class of the patching task
    "pairs": 64,                    # at most this many clean/corrupt pairs
    "probe_layers": "all",          # layers harvested and probed
    "probe_folds": 5,
    "probe_threads": 2,             # layers swept in parallel (execution only)
    "probe_erase": False,           # LEACE check in the sweep (the direction stage runs LEACE at the layer)
    "scan_random": 0,               # random directions per layer in the scan (a band in its figure)
    "min_full": 0.5,                # a layer is eligible when its full patch restores this much
    "layer": None,                  # fix the candidate layer (None: the scan's choice)
    "blocks_ablation": "zero",
    "blocks_positions": "all",
    "hydra_ablation": "mean",
    "path_receiver": "v",           # the top head's input that path patching targets: q, k or v
    # senders: every head of the N layers below the top head (None: every earlier layer; on SmolLM2
    # at layer 20 that is 180 heads, 362 patched runs, about 20 minutes on a busy 2-core CPU)
    "path_sender_layers": 2,
    "path_confirm_ablation": "mean",  # ablating only the strongest path
    "grid_classes": "artist,athlete,scientist,politician,writer",
    "grid_pairs": 4,                # entity pairs per ordered class pair (16: 320 pairs, ~4x the time)
    "grid_controls": True,
    "ranks": "1..4",
    "n_random": 100,                # random directions of the direction-patching verdict
    # The SAE (README "Demo"): 2048 latents, k 32, 196,608 training samples over 49,152 corpus
    # tokens: ~150 CPU-s. `make sae` trains the 4096-latent one (800k samples, ~12 CPU-min).
    "sae_d_sae": 2048,
    "sae_k": 32,
    "sae_tokens": 196_608,          # training samples (vectors seen, with repeats)
    "sae_corpus_tokens": 49_152,    # distinct corpus tokens run through the model
    "sae_eval_tokens": 2048,
    "sae_lens_tokens": 512,         # SAELens run_evals cross-check on this many tokens (0: off)
    "latent_top": 5,
    "latent_random": 50,
    "n_boot": 1000,
    "seed": 0,
    # torch / BLAS threads of every stage (execution only; None: unchanged). One, because on a
    # shared 2-core CPU two threads spin against each other: a harvest took 9x longer with two.
    "threads": 1,
}
QUICK = {
    "pairs": 12, "probe_layers": "15-18", "probe_folds": 3, "path_sender_layers": 1,
    "grid_classes": "artist,scientist", "grid_pairs": 2, "ranks": "1,2", "n_random": 10, "sae_d_sae": 256,
    "sae_k": 16, "sae_tokens": 8192, "sae_corpus_tokens": 2048, "sae_eval_tokens": 512, "sae_lens_tokens": 0,
    "latent_random": 10, "n_boot": 200,
}


def known_items(ctx) -> dict:
    """W3 guard-rail: score the prompt set and keep the items the model knows (a JSONL file)."""
    c, m = ctx.config, ctx.model
    ps = load_prompts(c["dataset"], tokenizer=m.tokenizer, prepend_bos=bool(m.cfg.default_prepend_bos))
    scores, s = check_dataset_cached(m, ps, scoring="first_token")
    kept = known_only(ps, scores)
    if len(kept) == 0:
        raise ReplabError(f"no item of {c['dataset']} is known to the model; nothing to study")
    path = ctx.out / f"{ps.name}_known.jsonl"
    kept.to_jsonl(path)
    rows = kept.rows
    by_class = rows[rows["template"].astype(str) != "odd_one_out"].groupby("superclass").size()
    return {"dataset": rel(path, ctx.run_dir), "n_prompts": s["n_prompts"], "n_with_answer": s["n_with_answer"],
            "n_known": len(kept), "known_fraction": s["known_fraction"], "accuracy": s["accuracy"],
            "candidate_accuracy": s["candidate_accuracy"], "median_rank": s["median_rank"],
            "known_by_class": [{"superclass": str(k), "known_prompts": int(v)} for k, v in by_class.items()],
            "command": (f"replab datasets check {c['dataset']}{model_flag(ctx)} --known-only "
                        f"--out {shlex.quote(str(path))}")}


def harvest_stage(ctx) -> dict:
    """The residual stream at each known person's last name token, at ``probe_layers``."""
    c = ctx.config
    data = stage_file(ctx, "known_items", "dataset")
    store = harvest(ctx.model, dataset=str(data), hooks="resid_post", layers=c["probe_layers"],
                    positions="entity_last", out=ctx.out / "store", progress=ctx.progress)
    s = store.summary()
    return {"store": rel(ctx.out / "store", ctx.run_dir), "n_rows": s["n_rows"], "n_hooks": s["hooks"],
            "command": (f"replab harvest{model_flag(ctx)} --dataset {shlex.quote(str(data))} --hooks resid_post "
                        f"--layers {c['probe_layers']} --positions entity_last --out {ctx.out / 'store'}")}


def probe(ctx) -> dict:
    """W3 step 6: the super-class probe sweep over layers, with the control task, shuffled labels
    and LEACE."""
    c = ctx.config
    store = stage_file(ctx, "harvest", "store")
    cfg = ProbeConfig(label="superclass", folds=c["probe_folds"], erase=c["probe_erase"], seed=c["seed"],
                      threads=c["probe_threads"])
    run = train_probes(store, config=cfg, out=ctx.out, progress=ctx.progress)
    best = run.summary["best"]
    d = run.summary["data"]
    return {"best_layer": run.best_layer, "best_accuracy": best["balanced_accuracy"],
            "best_heldout": best.get("heldout_balanced_accuracy"), "best_control": best.get("control_accuracy"),
            "best_selectivity": best.get("selectivity"), "best_shuffled": best.get("shuffled_accuracy"),
            "best_erased": best.get("erased_accuracy"), "n_rows": d["rows"], "n_classes": len(d["class_counts"]),
            "chance": 1 / len(d["class_counts"]), "split": d["split_column"],
            "figures": [rel(ctx.out / "figures" / "accuracy_vs_layer.png", ctx.run_dir)],
            "command": (f"replab probe train --store {shlex.quote(str(store))} --label superclass "
                        f"--folds {c['probe_folds']} {'--erase' if c['probe_erase'] else '--no-erase'} "
                        f"--seed {c['seed']} --threads {c['probe_threads']} "
                        f"--out {ctx.out}")}


def scan(ctx) -> dict:
    """The feature scan: per layer the full-residual and the probe direction's patch at the name;
    it chooses the candidate layer (or the ``layer`` option fixes it)."""
    c = ctx.config
    probe_dir = ctx.run_dir.resolve() / "probe"
    t = task_options(ctx)
    cfg = ScanRunConfig(probe=str(probe_dir), **t, scan=ScanConfig(
        cls=clean_class(c), n_random=c["scan_random"], min_full=c["min_full"], seed=c["seed"], n_boot=c["n_boot"]))
    s = run_scan(config=cfg, out=ctx.out, model=ctx.model, progress=ctx.progress)
    layer = c["layer"] if c["layer"] is not None else s["chosen_layer"]
    if layer is None:
        raise ReplabError(f"the feature scan chose no layer ({s['reason']}); fix one with --set layer=N")
    row = next(r for r in s["table"] if r["layer"] == int(layer))
    return {"layer": int(layer), "chosen_layer": s["chosen_layer"], "fixed": c["layer"] is not None,
            "reason": s["reason"], "min_full": s["min_full"], "probe_best_layer": s["probe_best_layer"],
            "probe_best_accuracy": s["probe_best_accuracy"], "probe_best_full_effect": s["probe_best_full_effect"],
            "full_effect": row["full_effect"], "direction_effect": row["direction_effect"],
            "probe_accuracy": row["probe_accuracy"], "n_eligible": sum(bool(r["eligible"]) for r in s["table"]),
            "n_layers": len(s["table"]), "max_full_layer": s["max_full_layer"],
            "table": [{k: r[k] for k in ("layer", "probe_accuracy", "full_effect", "direction_effect")}
                      for r in s["table"]],
            "figures": png_figures(ctx, s["files"]),
            "command": (f"replab features scan{model_flag(ctx)} --probe {probe_dir} --class {clean_class(c)} "
                        f"{task_flags(ctx)} --random {c['scan_random']} --min-full {c['min_full']} "
                        f"--seed {c['seed']} --n-boot {c['n_boot']} --out {ctx.out}")}


TASK_KEYS = ("classes", "pairs", "n_boot", "seed")
STAGES = (
    Stage("known_items", "the known-item filter on the superset prompts", limited(known_items), ("dataset",)),
    Stage("harvest", "residual stream at each person's last name token", limited(harvest_stage),
          ("probe_layers",)),
    Stage("probe", "super-class probe sweep with controls", limited(probe),
          ("probe_folds", "probe_threads", "probe_erase", "seed")),
    Stage("scan", "feature scan: the candidate layer", limited(scan),
          ("classes", "pairs", "scan_random", "min_full", "layer", "n_boot", "seed"), slow=True),
    Stage("blocks", "block sweeps at the candidate layer (necessity, sufficiency)", limited(blocks),
          TASK_KEYS + ("blocks_ablation", "blocks_positions")),
    Stage("hydra", "backup heads after ablating the top head", limited(hydra), TASK_KEYS + ("hydra_ablation",)),
    Stage("path", "path patching from earlier heads into the top head", limited(path),
          TASK_KEYS + ("path_receiver", "path_sender_layers", "path_confirm_ablation"), slow=True),
    Stage("grid", "generalisation grid split by class, with negative controls", limited(grid),
          ("grid_classes", "grid_pairs", "grid_controls", "blocks_ablation", "blocks_positions", "n_boot", "seed"),
          slow=True),
    Stage("rank", "rank-k probes at the candidate layer", limited(rank), ("ranks", "probe_folds", "seed")),
    Stage("direction", "direction patching verdict with random baselines", limited(direction),
          TASK_KEYS + ("n_random",), slow=True),
    Stage("sae_train", "SAE at the candidate layer (trained once, cached)", limited(sae_train),
          ("sae_d_sae", "sae_k", "sae_tokens", "sae_corpus_tokens", "seed"), slow=True),
    Stage("sae_eval", "SAE on held-out text", limited(sae_eval), ("sae_eval_tokens", "sae_lens_tokens")),
    Stage("sae_decompose", "the direction onto SAE latents", limited(sae_decompose), ("classes", "latent_top")),
    Stage("latents", "latent patching verdict", limited(latents), TASK_KEYS + ("latent_top", "latent_random")),
)

EXPERIMENT = Experiment(
    name="superset", workflow="W3", title="Is there an artistness direction, and is it causally sufficient?",
    description=("Known-item filter, probe sweep, feature scan, block sweeps, hydra, path patching, the "
                 "generalisation grid, rank, direction patching, an SAE and latent patching."),
    defaults=DEFAULTS, quick=QUICK, stages=STAGES, headline=headline, narrative=narrative)
