"""Tuned-lens bench: training time and tokens, and KL curves (logit vs tuned) on held-out text.

    python bench/bench_lens.py                # use the cached default lens (train if missing)
    python bench/bench_lens.py --retrain      # retrain the default lens now (~3 CPU min, one thread)
    python bench/bench_lens.py --tokens 2048  # held-out tokens to score
    python bench/bench_lens.py --figure docs/img/lens_kl.png   # also write the README figure
    python bench/bench_lens.py --table next_day   # time `lens logit|tuned --dataset next_day`
    python bench/bench_lens.py --compare-init     # KL phase from the identity vs from least squares

Prints the training record (wall time, CPU time, tokens, config) and a per-layer table
of KL(final || lens) and cross-entropy for both lenses at every point 0..n_layers, and says
whether the tuned lens is below the logit lens at every layer. Writes runs/bench-lens/
(eval.csv, eval.png, summary.json) and, with --figure, the same plot to that path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--retrain", action="store_true", help="train even if a lens is cached")
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens to score")
    ap.add_argument("--out", default="runs/bench-lens")
    ap.add_argument("--figure", metavar="PNG", help="also write the KL/CE plot here "
                    "(docs/img/lens_kl.png for the README)")
    ap.add_argument("--table", metavar="DATASET", help="time the lens table on a prompt set, then exit")
    ap.add_argument("--compare-init", action="store_true",
                    help="KL phase from the identity vs from the least-squares fit, then exit")
    args = ap.parse_args(argv)
    if args.table:
        return bench_table(args.model, args.table, args.out)
    if args.compare_init:
        return compare_init(args.model)

    from replab.lenses.cache import read_meta
    from replab.lenses.evaluate import run_eval, wide
    from replab.lenses.train import TrainConfig
    from replab.lenses.tuned import default_lens_dir, model_identity, train_lens
    from replab.models.tiny_hf import resolve

    name = resolve(args.model)
    identity = model_identity(name)
    path = default_lens_dir(identity)
    if args.retrain or not path.exists():
        t0, c0 = time.perf_counter(), _cpu()
        path, _ = train_lens(name, TrainConfig(), identity=identity, force=True)
        print(f"trained now: wall {time.perf_counter() - t0:.0f} s, process CPU {_cpu() - c0:.0f} s")
    meta = read_meta(path)
    st, cfg = meta["stats"], meta["config"]
    print(f"model: {identity['name']}  lens: {path}")
    print(f"training (recorded {meta['created']}): {st['seconds_total']} s wall, "
          f"{st.get('cpu_seconds')} CPU-s, {st.get('torch_threads')} torch thread(s) "
          f"(least squares {st['seconds_fit']} s, KL {st['seconds_kl']} s); "
          f"{st['fit_tokens']} tokens through the model, {st['kl_positions_seen']} KL positions x "
          f"{identity['n_layers']} layers; corpus {cfg['corpus']!r}")
    print("config: " + json.dumps(cfg))
    t0 = time.perf_counter()
    df, summary = run_eval(name, "builtin-heldout", args.tokens, 128, None, args.out, progress=False)
    w = wide(df)
    print(f"\nheld-out eval ({summary['config']['tokens']} tokens of builtin-heldout, "
          f"{time.perf_counter() - t0:.0f} s), nats:")
    print(f"{'layer':>5} {'KL logit':>10} {'KL tuned':>10} {'CE logit':>10} {'CE tuned':>10}")
    for r in w.itertuples(index=False):
        print(f"{r.layer:>5} {r.kl_logit:>10.3f} {r.kl_tuned:>10.3f} {r.ce_logit:>10.3f} {r.ce_tuned:>10.3f}")
    ok = summary["tuned_better_every_layer"]
    print(f"\ntuned lens KL < logit lens KL at every layer 0..{identity['n_layers'] - 1}: {ok}")
    print(f"wrote {args.out}/eval.csv and eval.png")
    if args.figure:
        from replab.lenses import plots

        fig = plots.eval_plot(df, args.figure, f"{identity['name'].split('/')[-1]}: logit vs tuned "
                              f"lens on {summary['config']['tokens']} held-out tokens "
                              f"(python bench/bench_lens.py)")
        print(f"wrote {fig}")
    return 0 if ok else 1


def bench_table(model, dataset: str, out: str) -> int:
    """Wall time of `replab lens logit|tuned --dataset DATASET` (model load vs table)."""
    from replab.lenses.run import apply_lens

    for kind in ("logit", "tuned"):
        t0, c0 = time.perf_counter(), _cpu()
        s = apply_lens(kind, model, dataset=dataset, out=f"{out}/{kind}-{dataset}", progress=False)
        ft = s["first_top1"]
        print(f"{kind:>5} lens on {dataset} ({s['n_prompts']} prompts): load {s['seconds_load']} s, "
              f"table {s['seconds_table']} s, total {time.perf_counter() - t0:.1f} s wall, "
              f"{_cpu() - c0:.0f} CPU-s; ever top-1 {ft['n_ever_top1']}/{ft['n_prompts']}, "
              f"median first top-1 layer {ft['median_first_top1_layer']}")
    return 0


def compare_init(model, fit_tokens: int = 1024) -> int:
    """Validation KL per layer: logit lens, KL phase from the identity, least squares, least
    squares + KL phase (the default config's steps, lr and batch, on a smaller pool)."""
    from replab.lenses.tuned import quiet_hf_model
    from replab.models import load_tokenizer
    from replab.models.tiny_hf import resolve
    from replab.threads import limit_threads

    name = resolve(model)
    hf, tok = quiet_hf_model(name), load_tokenizer(name)
    hf.requires_grad_(False)
    with limit_threads(1):
        return _compare_init(hf, tok, fit_tokens)


def _compare_init(hf, tok, fit_tokens: int) -> int:
    import torch
    from tuned_lens.nn.lenses import TunedLens

    from replab.lenses.least_squares import fit_phase, solve_translators
    from replab.lenses.norms import probe_norm
    from replab.lenses.train import TrainConfig, kl_phase, per_layer_kl
    from replab.prompts.corpus import read_corpus, token_chunks

    cfg = TrainConfig(fit_tokens=fit_tokens, pool_fraction=1.0)
    chunks = token_chunks(read_corpus(cfg.corpus), tok, cfg.seq_len, fit_tokens + 2 * cfg.seq_len, cfg.seed)
    t0 = time.perf_counter()
    spec = probe_norm(TunedLens.from_model(hf).unembed.final_norm, hf.config.hidden_size)
    if spec is None:
        print("the final norm is not one the least-squares fit handles; nothing to compare")
        return 1
    xtx, xty, pool, val, _ = fit_phase(hf, chunks, cfg, progress=False, n_val_chunks=2, spec=spec)
    val = val[torch.randperm(len(val), generator=torch.Generator().manual_seed(2))[:cfg.val_positions]]
    identity = TunedLens.from_model(hf)
    curves = {"logit": per_layer_kl(identity, val)}
    kl_phase(identity, pool, cfg, progress=False)
    curves["identity+kl"] = per_layer_kl(identity, val)
    ls = TunedLens.from_model(hf)
    solve_translators(ls, xtx, xty, cfg.ridge)
    curves["least_squares"] = per_layer_kl(ls, val)
    kl_phase(ls, pool, cfg, progress=False)
    curves["least_squares+kl"] = per_layer_kl(ls, val)
    print(f"{fit_tokens} fit tokens, {len(pool)} pool / {len(val)} validation positions, "
          f"{cfg.steps} KL steps x {cfg.batch_positions} positions, lr {cfg.lr}; "
          f"{time.perf_counter() - t0:.0f} s. Validation KL(final || lens), nats:")
    print("layer " + " ".join(f"{k:>17}" for k in curves))
    for layer in range(len(ls)):
        print(f"{layer:>5} " + " ".join(f"{v[layer].item():>17.3f}" for v in curves.values()))
    print("mean  " + " ".join(f"{v.mean().item():>17.3f}" for v in curves.values()))
    return 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    sys.exit(main())
