"""Benchmark: circuit tools against plain TransformerLens loops, side by side in one process.

1. **Path patching**, every head of the model as a sender into ``logits`` (270 paths on
   SmolLM2), next_day task: ``replab.circuits.path.path_patch`` (one batched engine run, its
   built-in checks included) against a loop of three plain TransformerLens forwards per path
   (clean run with cache, corrupt run with cache, the patched run: every head's ``hook_z``
   frozen at clean but the sender's, from corrupt). Prints both times, the speed-up and the
   largest per-prompt difference of the logit difference.
2. **Single-head mean ablations** (the pruner's primitive): every head mean-ablated alone on
   the sequence task, one batched ``run_plan`` against one hooked TransformerLens forward per
   head.
3. **Pruning** (``--prune``): ``prune_heads`` on the sequence task down to the 0.7 level,
   per order: time and variant forwards (``--orders``, default attribution,reverse,random:1;
   add greedy with ``--candidates 16`` for the greedy target).

    python bench/bench_circuits.py --threads 2 --json runs/bench/circuits.json
    python bench/bench_circuits.py --model tiny            # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _ld(logits, task):
    import torch

    i = torch.arange(task.n_prompts)
    return (logits[:, -1][i, task.answer] - logits[:, -1][i, task.foil])


def tl_path_loop(model, task, heads):
    """Three plain TransformerLens forwards per path; per-prompt logit differences ``[P, N]``."""
    import torch

    L = model.cfg.n_layers
    out = []
    with torch.inference_mode():
        for layer, head in heads:
            _, cc = model.run_with_cache(task.clean, names_filter=lambda n: n.endswith("hook_z"))
            _, xc = model.run_with_cache(task.corrupt, names_filter=lambda n: n.endswith("hook_z"))

            def z(a, hook, layer=layer, head=head, cc=cc, xc=xc):
                new = cc[hook.name].clone()
                if hook.layer() == layer:
                    new[:, :, head] = xc[hook.name][:, :, head]
                return new
            logits = model.run_with_hooks(task.clean, fwd_hooks=[(f"blocks.{k}.attn.hook_z", z) for k in range(L)])
            out.append(_ld(logits, task))
    return torch.stack(out).numpy()


def tl_ablation_loop(model, task, heads):
    """One hooked forward per head: that head's z mean-ablated (clean mean, per position)."""
    import torch

    out = []
    with torch.inference_mode():
        _, cc = model.run_with_cache(task.clean, names_filter=lambda n: n.endswith("hook_z"))
        for layer, head in heads:
            name = f"blocks.{layer}.attn.hook_z"

            def f(a, hook, head=head, name=name):
                a = a.clone()
                a[:, :, head] = cc[name].mean(0)[None][:, :, head]
                return a
            out.append(_ld(model.run_with_hooks(task.clean, fwd_hooks=[(name, f)]), task))
    return torch.stack(out).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default SmolLM2; 'tiny' for a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-limit", type=int, default=8, help="prompts of the sequence task")
    ap.add_argument("--skip-path", action="store_true")
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--prune", action="store_true", help="also time pruning orders")
    ap.add_argument("--orders", default="attribution,reverse,random:1")
    ap.add_argument("--candidates", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import numpy as np
    import torch

    from replab.circuits.components import all_heads
    from replab.circuits.path import parse_receiver, path_patch
    from replab.circuits.runs import load
    from replab.patching.engine import Variant
    from replab.patching.interventions import Intervention
    from replab.patching.plan import run_plan

    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "load_average_start": os.getloadavg()}
    model, nd = load(args.model, "next_day")
    heads = all_heads(model)
    if not args.skip_path:
        t0 = time.time()
        res = path_patch(model, nd, [[h] for h in heads], parse_receiver("logits"), n_boot=200)
        t_replab = time.time() - t0
        t0 = time.time()
        ref = tl_path_loop(model, nd, [(h.layer, h.head) for h in heads])
        t_tl = time.time() - t0
        diff = float(np.abs(res.plan.patched[:len(heads)] - ref).max())
        out["path"] = {"task": nd.describe(), "paths": len(heads), "replab_s": round(t_replab, 2),
                       "tl_loop_s": round(t_tl, 2), "speedup": round(t_tl / t_replab, 2), "max_abs_diff": diff,
                       "tl_forwards": 3 * len(heads), "replab_engine_variants": res.summary["n_variants"],
                       "checks": {k: v["value"] for k, v in res.summary["checks"].items()}}
        print(f"path patching, {len(heads)} senders into logits ({nd.n_prompts} prompts x {nd.n_tokens} tokens): "
              f"replab {t_replab:.1f} s, TransformerLens loop {t_tl:.1f} s ({3 * len(heads)} forwards): "
              f"{t_tl / t_replab:.1f}x, max |diff| {diff:.2e}")
    _, seq = load(args.model, "sequences", limit=args.seq_limit)
    if not args.skip_ablation:
        variants = [Variant((Intervention("z", h.layer, head=h.head, source="mean"),), name=h.name) for h in heads]
        t0 = time.time()
        res = run_plan(model, seq, variants, "logit_diff", base="clean", n_boot=200)
        t_replab = time.time() - t0
        t0 = time.time()
        ref = tl_ablation_loop(model, seq, [(h.layer, h.head) for h in heads])
        t_tl = time.time() - t0
        diff = float(np.abs(res.patched - ref).max())
        out["ablation"] = {"task": seq.describe(), "heads": len(heads), "replab_s": round(t_replab, 2),
                           "tl_loop_s": round(t_tl, 2), "speedup": round(t_tl / t_replab, 2), "max_abs_diff": diff}
        print(f"{len(heads)} single-head mean ablations ({seq.n_prompts} prompts x {seq.n_tokens} tokens): replab "
              f"{t_replab:.1f} s, TransformerLens loop {t_tl:.1f} s: {t_tl / t_replab:.1f}x, max |diff| {diff:.2e}")
    if args.prune:
        from replab.circuits.prune import prune_heads

        res = prune_heads(model, seq, orders=args.orders, candidates=args.candidates, check_every=25, n_boot=50)
        out["prune"] = {"task": seq.describe(), "timing": res.summary["timing"],
                        "variant_forwards": res.summary["variant_forwards"],
                        "attribution_passes": res.summary["attribution_passes"],
                        "agreement": {k: v for k, v in res.agreement.items() if k != "checks"},
                        "levels": [{k: lv[k] for k in ("order", "threshold", "n_heads", "performance")}
                                   for lv in res.levels]}
        for order, t in res.summary["timing"].items():
            print(f"prune {order}: {t['seconds']:.0f} s, {t['variant_forwards']} variant forwards, "
                  f"{t['heads_removed']} heads removed")
    out["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
