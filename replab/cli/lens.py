"""``replab lens ...``: logit lens, tuned lens (train / apply / eval), builtin corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from replab.cli._common import JSON_OPT, MODEL_OPT, examples, human_console, print_json

app = typer.Typer(help="Logit lens and tuned lens: decode every layer; train, apply, evaluate.",
                  no_args_is_help=True)

_PROMPT = typer.Option(None, "--prompt", "-p", help="One prompt to decode.")
_DATASET = typer.Option(None, "--dataset", "-d", help="Prompt set (builtin name or JSONL/CSV path).")
_TARGET = typer.Option(None, "--target", "-t",
                       help="Token to track, with its leading space (' Tuesday'). "
                            "Default for a prompt set: each row's answer.")
_TOPK = typer.Option(5, "--top-k", "-k", help="Top-k tokens per cell in the table.")
_OUT = typer.Option(None, "--out", "-o", help="Run directory (default runs/lens-<kind>-<set>).")
_INDEX = typer.Option(0, "--index", help="Prompt (0-based) drawn in the trajectory heatmap.")
_LIMIT = typer.Option(None, "--limit", help="Use only the first N prompts of the set.")
_LENS = typer.Option(None, "--lens", help="Tuned-lens directory (default: the cached lens).")
_THREADS = typer.Option(1, "--threads", min=0,
                        help="Torch threads (default 1: fastest on a busy CPU; 0 = torch's default).")


def _apply(kind, model, prompt, dataset, target, mid, top_k, out, index, limit, lens, threads,
           json_out):
    from replab.lenses.run import apply_lens

    summary = apply_lens(kind, model, prompt, dataset, target, mid, top_k, out, index, limit,
                         lens, progress=not json_out, threads=threads or None)
    if json_out:
        print_json(summary)
        return
    _print_apply(summary)


def _print_apply(summary: dict) -> None:
    import pandas as pd

    out = Path(summary["out"])
    console = human_console()
    table = pd.read_parquet(out / "table.parquet")
    if summary["n_prompts"] == 1:
        last = table[table["position"] == table["position"].max()].sort_values("depth")
        cols = ["point", "top1", "top1_prob", "entropy", "kl_to_final"]
        if last["target_rank"].notna().any():
            cols += ["target_prob", "target_rank"]
        _rich(console, last[cols], f"{summary['kind']} at the last position")
    ft = summary.get("first_top1")
    if ft:
        if summary["n_prompts"] > 1:
            _print_first_top1(console, ft, summary["kind"])
        console.print(
            f"target ever top-1: {ft['n_ever_top1']}/{ft['n_prompts']} prompts "
            f"({ft['frac_ever_top1']:.0%}), first at layer (median) "
            f"{ft['median_first_top1_layer']}; top-1 at the output: {ft['n_final_top1']}/"
            f"{ft['n_prompts']} ({ft['frac_final_top1']:.0%}), for those first at layer (median) "
            f"{ft['median_first_top1_layer_final_top1']}, stays top-1 from (median) "
            f"{ft['median_stable_top1_layer']}")
        if summary["n_prompts"] > 1:
            console.print(f"first top-1 layer -> prompts: {ft['first_top1_layer_counts']}")
    if "logit_diff_final_mean" in summary:
        console.print(f"mean final logit difference (answer − foil): "
                      f"{summary['logit_diff_final_mean']:.3f}")
    console.print(f"wrote {out}/ (table.parquet, table.csv, summary.json, "
                  + ", ".join(Path(f).name for f in summary["figures"]) + ")")


def _print_first_top1(console, ft: dict, kind: str) -> None:
    """Per-prompt first-top-1 table (and per template), compact column names."""
    import pandas as pd

    per = pd.DataFrame(ft["per_prompt"])
    if "prompt" in per:
        per["prompt"] = per["prompt"].map(lambda p: p if len(p) <= 44 else p[:43] + "…")
    names = {"prompt_id": "id", "prompt": "prompt", "target": "target",
             "first_top1_layer": "first top-1", "stable_top1_layer": "stable from",
             "final_rank": "final rank", "final_prob": "final p"}
    per = per[[c for c in names if c in per]].rename(columns=names)
    _rich(console, per, f"{kind}: layer where the target first becomes top-1 (last position; "
                        "None = never)")
    if "by_template" in ft:
        cols = {"n_prompts": "n", "n_final_top1": "top-1 at output", "n_ever_top1": "ever top-1",
                "median_first_top1_layer": "first (median)",
                "median_first_top1_layer_final_top1": "first, if top-1 at output",
                "median_stable_top1_layer": "stable from"}
        rows = pd.DataFrame([{"template": t, **{v: g[k] for k, v in cols.items()}}
                             for t, g in ft["by_template"].items()])
        _rich(console, rows, "per template (medians over prompts that reach top-1)")


def _rich(console, df, title: str) -> None:
    from rich.table import Table

    t = Table(title=title)
    for c in df.columns:
        t.add_column(str(c))
    for _, row in df.iterrows():
        t.add_row(*[("None" if v != v else f"{v:.4g}") if isinstance(v, float)
                    else repr(v) if isinstance(v, str) else str(v) for v in row])
    console.print(t)


@app.command("logit", epilog=examples(
    "replab lens logit --prompt 'Today it is Monday so tomorrow it is' --target ' Tuesday'",
    "replab lens logit --dataset next_day --mid --out runs/lens-next_day",
    "replab lens logit --dataset fact_recall --json",
))
def logit_cmd(prompt: str = _PROMPT, dataset: str = _DATASET, target: str = _TARGET,
              mid: bool = typer.Option(False, "--mid", help="Also decode resid_mid (after attention)."),
              model: str = MODEL_OPT, top_k: int = _TOPK, out: Path = _OUT, index: int = _INDEX,
              limit: int = _LIMIT, threads: int = _THREADS, json_out: bool = JSON_OPT):
    """Logit lens: decode every layer and position with the model's own final norm + unembedding.

    Writes a per-cell table, per-prompt first-top-1 layers (first_top1.csv; printed, and in
    --json under first_top1.per_prompt) and figures; see docs/lenses.md.
    """
    _apply("logit", model, prompt, dataset, target, mid, top_k, out, index, limit, None, threads,
           json_out)


@app.command("tuned", epilog=examples(
    "replab lens tuned --prompt 'The capital of France is' --target ' Paris'",
    "replab lens tuned --dataset next_day --out runs/tuned-next_day",
    "replab lens tuned --dataset fact_recall --lens runs/my-lens --json",
))
def tuned_cmd(prompt: str = _PROMPT, dataset: str = _DATASET, target: str = _TARGET,
              mid: bool = typer.Option(False, "--mid", help="Not available for the tuned lens "
                                       "(no translators after attention): an error."),
              model: str = MODEL_OPT, top_k: int = _TOPK, out: Path = _OUT, index: int = _INDEX,
              limit: int = _LIMIT, lens: Path = _LENS, threads: int = _THREADS,
              json_out: bool = JSON_OPT):
    """Tuned lens (the default lens of `replab lens train`, or --lens DIR): same outputs as
    `lens logit`, incl. the logit-difference curve for clean/corrupt sets (from the translated
    residual at each layer; see docs/lenses.md). There is no --mid equivalent."""
    _apply("tuned", model, prompt, dataset, target, mid, top_k, out, index, limit, lens, threads,
           json_out)


@app.command("train", epilog=examples(
    "replab lens train                 # the default lens (cached: a second run returns at once)",
    "replab lens train --force         # retrain the default lens",
    "replab lens train --model tiny --tokens 2048 --steps 5",
    "replab lens train --corpus my_texts/ --tokens 32768 --steps 60 --out runs/my-lens",
))
def train_cmd(model: str = MODEL_OPT,
              corpus: str = typer.Option("builtin", "--corpus",
                                         help="'builtin', a .txt/.jsonl file, or a directory."),
              tokens: int = typer.Option(16384, "--tokens",
                                         help="Tokens for the least-squares phase."),
              steps: int = typer.Option(30, "--steps", help="Adam steps of the KL phase (0 = none)."),
              batch_positions: int = typer.Option(32, "--batch-positions",
                                                  help="Positions per KL step."),
              lr: float = typer.Option(1e-4, "--lr"),
              seq_len: int = typer.Option(128, "--seq-len"),
              seed: int = typer.Option(0, "--seed"),
              out: Path = typer.Option(None, "--out", "-o",
                                       help="Write here instead of the cache directory of this "
                                            "model and config."),
              force: bool = typer.Option(False, "--force",
                                         help="Retrain even if this lens (same model, corpus "
                                              "content and settings) is already saved there."),
              threads: int = _THREADS,
              json_out: bool = JSON_OPT):
    """Train a tuned lens (least-squares init + KL to the final layer), unless it is cached.

    Lenses are cached per model and training config (corpus content and every setting): the
    default settings give the default lens, which `lens tuned` and `lens eval` use; any other
    corpus or setting is cached under its own key (or --out) and never replaces it.
    """
    from replab.lenses.train import TrainConfig
    from replab.lenses.tuned import train_lens
    from replab.models.tiny_hf import resolve

    cfg = TrainConfig(corpus=corpus, seq_len=seq_len, fit_tokens=tokens, steps=steps,
                      batch_positions=batch_positions, lr=lr, seed=seed)
    path, stats = train_lens(resolve(model), cfg, out, progress=not json_out,
                             threads=threads or None, force=force)
    result = {"path": str(path), "config": cfg.to_dict(),
              **{k: v for k, v in stats.items() if k != "kl_losses"}}
    if json_out:
        print_json(result)
        return
    if stats["cached"]:
        typer.echo(f"an identical lens (same model, corpus and settings) is already at {path}; "
                   f"not retraining (--force retrains). It was trained in "
                   f"{stats['seconds_total']} s on {stats['fit_tokens']} tokens.")
        return
    typer.echo(f"trained in {stats['seconds_total']} s ({stats['cpu_seconds']} CPU-s) on "
               f"{stats['fit_tokens']} tokens (+{stats['kl_positions_seen']} KL positions); "
               f"saved {path}")
    typer.echo("validation KL per layer (logit lens -> least-squares init -> after KL training): "
               + ", ".join(f"{i}: {a:.2f}->{b:.2f}->{c:.2f}" for i, (a, b, c) in enumerate(zip(
                   stats["val_kl_logit"], stats["val_kl_least_squares"], stats["val_kl_tuned"], strict=True))))


@app.command("export", epilog=examples(
    "replab lens export --out runs/lens-for-tuned-lens",
    "replab lens export --lens runs/my-lens --out runs/my-lens-tl --json",
))
def export_cmd(out: Path = typer.Option(..., "--out", "-o",
                                        help="Directory to write (absent, empty or an earlier export)."),
               model: str = MODEL_OPT, lens: Path = _LENS, json_out: bool = JSON_OPT):
    """Write a cached tuned lens in tuned-lens's own format (config.json + params.pt).

    For `TunedLens.from_model_and_pretrained(hf_model, lens_resource_id=OUT)`. params.pt is a
    torch pickle of tensors (tuned-lens loads it with weights_only=True); replab's cache holds
    safetensors only and never reads it.
    """
    from replab.lenses.tuned import export_lens
    from replab.models.tiny_hf import resolve

    path = export_lens(out, resolve(model), lens)
    if json_out:
        print_json({"path": str(path)})
        return
    typer.echo(f"wrote {path}/ (config.json, params.pt, translators.safetensors, replab.json)")


@app.command("eval", epilog=examples(
    "replab lens eval",
    "replab lens eval --tokens 4096 --out runs/lens-eval --json",
    "replab lens eval --corpus heldout.jsonl --lens runs/my-lens",
))
def eval_cmd(model: str = MODEL_OPT,
             corpus: str = typer.Option("builtin-heldout", "--corpus",
                                        help="Held-out text: 'builtin-heldout', a file or a directory."),
             tokens: int = typer.Option(1024, "--tokens", help="Held-out tokens to score."),
             seq_len: int = typer.Option(128, "--seq-len"),
             lens: Path = _LENS,
             out: Path = typer.Option(None, "--out", "-o", help="Run directory (default runs/lens-eval)."),
             threads: int = _THREADS,
             json_out: bool = JSON_OPT):
    """Per layer KL(final ‖ lens) and cross-entropy, logit vs tuned lens, on held-out text.

    --json prints a list of {"layer": int, "lens": "logit"|"tuned", "kl": float, "ce": float}.
    """
    from replab.lenses.evaluate import run_eval, wide

    df, summary = run_eval(model, corpus, tokens, seq_len, lens, out, progress=not json_out,
                           threads=threads or None)
    if json_out:
        print_json(df.to_dict(orient="records"))
        return
    console = human_console()
    _rich(console, wide(df), f"lens quality on {corpus} ({summary['config']['tokens']} tokens), nats")
    verdict = "lower" if summary["tuned_better_every_layer"] else "NOT lower"
    console.print(f"tuned-lens KL is {verdict} than the logit lens at every layer; "
                  f"wrote {summary['out']}/ (eval.csv, eval.png, summary.json)")


@app.command("corpus", epilog=examples("replab lens corpus", "replab lens corpus --write --json"))
def corpus_cmd(write: bool = typer.Option(False, "--write",
                                          help="Regenerate datasets/corpus/{train,heldout}.txt."),
               model: str = MODEL_OPT, json_out: bool = JSON_OPT):
    """Show (or regenerate) the builtin lens corpus: documents and token counts per split."""
    from replab.models import load_tokenizer
    from replab.prompts.corpus import (
        BUILTIN,
        BUILTIN_HELDOUT,
        count_tokens,
        read_corpus,
        write_builtin,
    )

    tok = load_tokenizer(model)
    if write:
        stats = write_builtin(tok)
    else:
        stats = {}
        for split, name in (("train", BUILTIN), ("heldout", BUILTIN_HELDOUT)):
            docs = read_corpus(name)
            stats[split] = {"docs": len(docs), "tokens": count_tokens(docs, tok)}
    if json_out:
        print_json(stats)
        return
    for split, s in stats.items():
        typer.echo(f"{split}: {s['docs']} documents, {s['tokens']} tokens")
