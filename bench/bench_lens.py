"""Tuned-lens bench: training time and tokens, and KL curves (logit vs tuned) on held-out text.

    python bench/bench_lens.py                # use the cached default lens (train if missing)
    python bench/bench_lens.py --retrain      # train the default lens now (~15-20 CPU min)
    python bench/bench_lens.py --tokens 2048  # held-out tokens to score

Prints the training record (wall time, CPU time, tokens, config) and a per-layer table
of KL(final || lens) and cross-entropy for both lenses, and says whether the tuned lens
is below the logit lens at every layer. Writes runs/bench-lens/ (eval.csv, eval.png).
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
    args = ap.parse_args(argv)

    from replab.lenses.evaluate import run_eval, wide
    from replab.lenses.store import cached_lens_dir, read_meta
    from replab.lenses.tiny_hf import resolve
    from replab.lenses.train import TrainConfig
    from replab.lenses.tuned import model_identity, train_lens

    name = resolve(args.model)
    identity = model_identity(name)
    path = cached_lens_dir(identity)
    if args.retrain or not path.exists():
        t0, c0 = time.perf_counter(), _cpu()
        path, _ = train_lens(name, TrainConfig(), identity=identity)
        print(f"trained now: wall {time.perf_counter() - t0:.0f} s, process CPU {_cpu() - c0:.0f} s")
    meta = read_meta(path)
    st, cfg = meta["stats"], meta["config"]
    print(f"model: {identity['name']}  lens: {path}")
    print(f"training (recorded {meta['created']}): {st['seconds_total']} s wall "
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
    return 0 if ok else 1


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    sys.exit(main())
