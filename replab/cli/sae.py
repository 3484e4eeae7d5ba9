"""``replab sae ...``: train, evaluate and inspect sparse autoencoders (SAELens)."""

from __future__ import annotations

from pathlib import Path

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, human_console, print_json, run_guarded

app = typer.Typer(help="Sparse autoencoders (SAELens): train on a hook, evaluate, decompose a "
                       "direction onto latents.", no_args_is_help=True)

LAYER_OPT = typer.Option(None, "--layer", "-l", help="Block index of the hook (e.g. 15).")
HOOK_OPT = typer.Option("resid_post", "--hook",
                        help="resid_pre|resid_mid|resid_post|attn_out|mlp_out|mlp_post or a full hook name.")
SAE_DIR_ARG = typer.Argument(None, help="SAE directory (default: the cached SAE of --model at --layer/--hook).")


@app.command("train", epilog=examples(
    "replab sae train --layer 20            # reuses a cached SAE with the same config (--force retrains)",
    "replab sae train --layer 15 --arch topk --k 64 --d-sae 4096 --tokens 800000 --threads 1 --json",
    "replab sae train --layer 20 --store runs/big_store --tokens 400000 --out runs/sae-store",
    "replab sae train --model tiny --layer 2 --d-sae 256 --k 8 --tokens 20480 --out runs/sae-tiny",
    "replab sae train --layer 15 --arch relu --l1 5 --corpus my_texts/ --out runs/sae-relu",
))
def train_cmd(layer: int = typer.Option(15, "--layer", "-l", help="Block index of the hook."),
              hook: str = HOOK_OPT,
              arch: str = typer.Option("topk", "--arch", help="topk | batchtopk | relu (ReLU + L1)."),
              k: float = typer.Option(64, "--k", help="Active latents per token (topk; batchtopk: on average)."),
              d_sae: int = typer.Option(4096, "--d-sae", help="Number of latents."),
              tokens: int = typer.Option(800_000, "--tokens",
                                         help="Training tokens (activation vectors seen, counting epochs)."),
              corpus: str = typer.Option("builtin", "--corpus",
                                         help="'builtin', a .txt/.jsonl file, or a directory."),
              corpus_tokens: int = typer.Option(None, "--corpus-tokens",
                                                help="Cap on distinct corpus tokens run through the model."),
              store: str = typer.Option(None, "--store",
                                        help="Train on an activation store's vectors at the hook (same "
                                             "model) instead of running the model over --corpus."),
              force: bool = typer.Option(False, "--force",
                                         help="Retrain even if an SAE with the same config, model and "
                                              "training data is already there."),
              l1: float = typer.Option(5.0, "--l1", help="L1 coefficient (relu only)."),
              lr: float = typer.Option(1e-3, "--lr"),
              batch_size: int = typer.Option(1024, "--batch-size", help="Activation vectors per SAE step."),
              seq_len: int = typer.Option(128, "--seq-len"),
              seed: int = typer.Option(0, "--seed"),
              threads: int = typer.Option(None, "--threads", help="torch threads (default: torch's)."),
              model: str = MODEL_OPT,
              out: Path = typer.Option(None, "--out", "-o",
                                       help="Write here instead of the per-model cache."),
              json_out: bool = JSON_OPT):
    """Train an SAE on one hook's activations over a text corpus (or a store); save it in SAELens's
    format. An SAE already trained with the same config, model and data is reused (--force retrains)."""
    run_guarded(_train, layer, hook, arch, k, d_sae, tokens, corpus, corpus_tokens, l1, lr,
                batch_size, seq_len, seed, threads, model, out, json_out, store, force)


def _train(layer, hook, arch, k, d_sae, tokens, corpus, corpus_tokens, l1, lr, batch_size,
           seq_len, seed, threads, model, out, json_out, store=None, force=False):
    from replab.features.sae.config import SAETrainConfig
    from replab.features.sae.train import train_sae

    cfg = SAETrainConfig(layer=layer, hook=hook, arch=arch, k=k, d_sae=d_sae, tokens=tokens,
                         corpus=corpus, corpus_tokens=corpus_tokens, l1_coefficient=l1, lr=lr,
                         batch_size=batch_size, seq_len=seq_len, seed=seed, threads=threads,
                         store=store)
    path, stats = train_sae(model, cfg, out, progress=not json_out, force=force)
    result = {"path": str(path), "config": cfg.to_dict(),
              **{k_: v for k_, v in stats.items() if k_ != "curve"}}
    if json_out:
        print_json(result)
        return
    if stats.get("cached"):
        typer.echo(f"cached: {path} was trained with the same config, model and data "
                   f"({stats.get('tokens_trained', 0):,} tokens, {stats.get('cpu_seconds')} CPU-s); "
                   "--force retrains")
        return
    typer.echo(f"trained {arch} SAE (d_sae={d_sae}) on {stats['tokens_trained']:,} tokens "
               f"({stats['unique_vectors']:,} distinct vectors, {stats['epochs']} epochs) in "
               f"{stats['seconds']} s wall, {stats['cpu_seconds']} CPU-s; "
               f"final training FVU {stats['train_fvu_last']:.3f}")
    typer.echo(f"saved {path}  (evaluate: replab sae eval {path})")


@app.command("eval", epilog=examples(
    "replab sae eval --layer 15",
    "replab sae eval runs/sae-tiny --json",
    "replab sae eval --layer 20 --sae-lens 1024        # + sae_lens run_evals on the same tokens",
    "replab sae eval ~/.cache/replab/saes/SmolLM2-135M-Instruct-<sha>/blocks.15.hook_resid_post "
    "--tokens 16384 --out runs/sae-eval",
))
def eval_cmd(sae_dir: Path = SAE_DIR_ARG, layer: int = LAYER_OPT, hook: str = HOOK_OPT,
             corpus: str = typer.Option("builtin-heldout", "--corpus",
                                        help="Held-out text: 'builtin-heldout', a file or a directory."),
             tokens: int = typer.Option(8192, "--tokens", help="Held-out tokens to score."),
             batch_size: int = typer.Option(4, "--batch-size", help="Windows per forward."),
             dense: float = typer.Option(0.1, "--dense-threshold",
                                         help="A latent firing on more than this fraction of tokens is dense."),
             force: bool = typer.Option(False, "--force", help="Re-evaluate even if --out already holds this "
                                                               "SAE's evaluation on the same text."),
             sae_lens: int = typer.Option(0, "--sae-lens", help="Also run sae_lens.evals.run_evals on this many "
                                                                "held-out tokens and store both (every position "
                                                                "scored), e.g. 1024; at least --batch-size "
                                                                "windows of the SAE's seq_len."),
             model: str = MODEL_OPT,
             out: Path = typer.Option(None, "--out", "-o", help="Run directory (default <SAE dir>/eval)."),
             json_out: bool = JSON_OPT):
    """L0, FVU, CE loss recovered, ΔCE, KL and dead/dense latents on held-out text.

    --json prints {"sae", "hook_name", "architecture", "d_sae", "metrics": {l0, fvu,
    ce_loss_recovered, delta_ce, kl_sae, dead_latents, dense_latents, ...}, "config", ...}.
    """
    run_guarded(_eval, sae_dir, layer, hook, corpus, tokens, batch_size, dense, model, out, json_out, force,
                sae_lens)


def _eval(sae_dir, layer, hook, corpus, tokens, batch_size, dense, model, out, json_out, force=False,
          sae_lens=0):
    from replab.features.sae.run import check_sae_lens_tokens, run_sae_eval

    check_sae_lens_tokens(sae_lens, batch_size)        # before any model or SAE is loaded
    if sae_dir is None and layer is None:
        from replab.errors import ReplabError

        raise ReplabError("give an SAE directory, or --layer for the cached SAE")
    summary, _ = run_sae_eval(sae_dir, model, corpus, tokens, batch_size=batch_size, out=out,
                              layer=layer, hook=hook, dense_threshold=dense,
                              progress=not json_out, force=force, sae_lens_tokens=sae_lens)
    if json_out:
        print_json(summary)
        return
    m = summary["metrics"]
    if summary.get("cached"):
        typer.echo(f"(cached: {summary['out']}/eval.json evaluated these SAE weights on the same text; --force reruns)")
    typer.echo(f"{summary['hook_name']} {summary['architecture']} d_sae={summary['d_sae']} on "
               f"{m['tokens']:,} held-out tokens ({corpus})")
    typer.echo(f"  L0 {m['l0']:.1f} | FVU {m['fvu']:.3f} | CE recovered {m['ce_loss_recovered']:.3f} "
               f"| ΔCE {m['delta_ce']:+.3f} nats (clean {m['ce_clean']:.3f}, SAE {m['ce_sae']:.3f}, "
               f"zero {m['ce_zero']:.3f}) | KL {m['kl_sae']:.3f}")
    typer.echo(f"  dead latents {m['dead_latents']} ({m['frac_dead']:.1%}), dense (>{dense:g}) "
               f"{m['dense_latents']}")
    cross = summary.get("sae_lens_crosscheck")
    if cross:
        typer.echo(f"  sae_lens run_evals on {cross['tokens']:,} tokens (every position, both): "
                   + ", ".join(f"{k} {v['replab']:.4g}/{v['sae_lens']:.4g}" for k, v in cross["metrics"].items())
                   + f"; max relative difference {cross['max_rel_diff']:.1e}")
    typer.echo(f"wrote {summary['out']}/ (eval.json, latents.parquet, latents.csv, latent_frequency.png)")


@app.command("decompose", epilog=examples(
    "replab sae decompose --direction runs/superset_probe_superclass/directions/logistic_L15_artist.json "
    "--store runs/superset",
    "replab sae decompose runs/sae-l15 --direction v.npy --store runs/superset --label superclass "
    "--class artist --top 15 --json",
    "replab sae decompose runs/sae-l15 --direction v.safetensors",
))
def decompose_cmd(sae_dir: Path = SAE_DIR_ARG,
                  direction: Path = typer.Option(..., "--direction", "-d",
                                                 help="Direction .json/.safetensors, or a raw "
                                                      ".npy/.safetensors vector."),
                  store: Path = typer.Option(None, "--store", help="Activation store with the SAE's hook."),
                  label: str = typer.Option(None, "--label", help="Label column (default: the Direction's)."),
                  cls: str = typer.Option(None, "--class", help="Positive class (default: the Direction's)."),
                  where: str = typer.Option(None, "--where", help="pandas query on the store index."),
                  top: int = typer.Option(10, "--top", help="Top latents to report."),
                  n_examples: int = typer.Option(5, "--examples", help="Top-activating rows per latent."),
                  n_tokens: int = typer.Option(10, "--logit-tokens", help="Logit-effect tokens per side."),
                  model: str = MODEL_OPT,
                  out: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/sae-decompose)."),
                  json_out: bool = JSON_OPT):
    """Cosine of a direction with every decoder row, class attribution, top latents with examples."""
    run_guarded(_decompose, sae_dir, direction, store, label, cls, where, top, n_examples,
                n_tokens, model, out, json_out)


def _decompose(sae_dir, direction, store, label, cls, where, top, n_examples, n_tokens, model,
               out, json_out):
    from replab.features.sae.run import run_decompose

    summary = run_decompose(sae_dir, direction, store, label, cls, top, n_examples, n_tokens,
                            out, where, model)
    if json_out:
        print_json(summary)
        return
    from rich.table import Table

    cols = [c for c in ("rank", "latent", "cosine", "diff", "contribution", "example_tokens",
                        "top_tokens") if summary["top"] and c in summary["top"][0]]
    t = Table(title=f"top latents at {summary['hook_name']}")
    for c in cols:
        t.add_column(c)
    for row in summary["top"]:
        t.add_row(*[f"{row[c]:.4g}" if isinstance(row[c], float) else _short(row[c]) for c in cols])
    console = human_console()
    console.print(t)
    if summary.get("reconstructed_fraction") is not None:
        console.print(f"latent contributions sum to {summary['reconstructed_fraction']:.1%} of the "
                      f"projected class difference ({summary['projected_class_difference']:.3g})")
    console.print(f"wrote {summary['out']}/ (" + ", ".join(summary["files"]) + ", summary.json)")


def _short(value) -> str:
    """First three ``a | b | c`` items of a token list, or the value."""
    text = str(value)
    return " | ".join(text.split(" | ")[:3]) if " | " in text else text[:40]
