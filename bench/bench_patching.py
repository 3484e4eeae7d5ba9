"""Benchmark: replab's batched patching engine against TransformerLens ``patching``.

Side by side in one run, on the same inputs (the next_day task on the default model), with the
same metric (mean logit difference at the last position):

* the resid_pre layer × position sweep (``get_act_patch_resid_pre``);
* the head-output sweep over layer × head (``get_act_patch_attn_head_out_all_pos``).

Each sweep is timed three ways back to back (the order reversed on odd ``--repeats``):

* ``tl``: TransformerLens on the model in TransformerLens's own weight layout (what a
  TransformerLens user runs: its ``GatedMLP``/``Unembed`` copy ``W.T.contiguous()`` on every
  forward);
* ``tl_relayout``: TransformerLens on the same model after replab's load-time
  :func:`replab.models.layout.linear_layout` (no copies; bit-identical results), which
  isolates the engine's own gain;
* ``replab``: :func:`replab.patching.sweeps.sweep` (includes its three sanity checks and a
  bootstrap CI).

The largest absolute difference between the TransformerLens and replab grids is printed:
speed and agreement come from the same run.

    .venv/bin/python bench/bench_patching.py                 # default model, 2 threads
    .venv/bin/python bench/bench_patching.py --threads 1 --limit 6 --json runs/bench/patching.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default SmolLM2; 'tiny' for a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch
    from transformer_lens import patching

    from replab.models.layout import linear_layout, row_major_layout
    from replab.patching.runs import load
    from replab.patching.sweeps import sweep

    torch.set_num_threads(args.threads)
    model, task = load(args.model, "next_day", limit=args.limit)

    def metric(logits):
        last = logits[:, -1]
        return (last.gather(1, task.answer[:, None])[:, 0] - last.gather(1, task.foil[:, None])[:, 0]).mean()

    with torch.inference_mode():
        _, clean_cache = model.run_with_cache(task.clean)
    cases = [("resid_pre layer × position", patching.get_act_patch_resid_pre, "resid_pre", "layer,position",
              ["layer", "position"]),
             ("head output layer × head", patching.get_act_patch_attn_head_out_all_pos, "z", "layer,head",
              ["layer", "head"])]
    def run_tl(tl_fn):
        with torch.inference_mode(), open(os.devnull, "w") as devnull:
            old, sys.stderr = sys.stderr, devnull        # TL's tqdm bar
            try:
                return tl_fn(model, task.corrupt, clean_cache, metric)
            finally:
                sys.stderr = old

    results = []
    for name, tl_fn, site, by, axes in cases:
        times = {"tl": [], "tl_relayout": [], "replab": []}
        for rep in range(args.repeats):
            order = ("tl", "tl_relayout", "replab") if rep % 2 == 0 else ("replab", "tl_relayout", "tl")
            for who in order:
                (row_major_layout if who == "tl" else linear_layout)(model)
                t0 = time.perf_counter()
                if who == "replab":
                    res = sweep(model, task, site=site, by=by, n_boot=200)
                else:
                    ref = run_tl(tl_fn)
                times[who].append(time.perf_counter() - t0)
        linear_layout(model)
        mine = res.table.sort_values(axes)["metric_after"].to_numpy()
        diff = float(abs(mine - ref.flatten().cpu().numpy()).max())
        tl, tl2, rl = (min(times[k]) for k in ("tl", "tl_relayout", "replab"))
        results.append({"sweep": name, "cells": int(ref.numel()), "transformer_lens_s": round(tl, 2),
                        "transformer_lens_relayout_s": round(tl2, 2), "replab_s": round(rl, 2),
                        "speedup": round(tl / rl, 1), "speedup_vs_relayout": round(tl2 / rl, 1),
                        "max_abs_diff": diff,
                        "replab_includes": "sanity checks (3 extra patched runs) and a bootstrap CI",
                        "runs_s": {k: [round(x, 2) for x in v] for k, v in times.items()}})
    info = {"model": model.replab_identity.name, "task": task.describe(), "threads": args.threads,
            "torch": torch.__version__, "load_average": os.getloadavg(), "results": results}
    print(f"model {info['model']}, task {task.name}: {task.n_prompts} prompts × {task.n_tokens} tokens, "
          f"{args.threads} threads, load average {info['load_average'][0]:.2f}")
    print("| sweep | cells | TransformerLens (s) | TransformerLens, replab layout (s) | replab (s) | "
          "speed-up | speed-up vs relayout | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sweep']} | {r['cells']} | {r['transformer_lens_s']} | "
              f"{r['transformer_lens_relayout_s']} | {r['replab_s']} | {r['speedup']}× | "
              f"{r['speedup_vs_relayout']}× | {r['max_abs_diff']:.1e} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
