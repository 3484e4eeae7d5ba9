"""Benchmark: head composition scores for all head pairs, and the W1 component report on one fact.

On the default model (SmolLM2-135M-Instruct: 30 layers × 9 query heads = 270 heads, 35,235
(sender, later receiver) pairs per mode):

* ``composition``: :func:`replab.heads.composition.composition_table` for Q, K and V (every
  pair, the random baseline, the tidy table), timed ``--repeats`` times; then TransformerLens's
  ``utils.composition_scores`` (what ``all_composition_scores`` runs) on the first
  ``--tl-layers`` layers only (its cost grows with the square of the number of heads: the
  full model needs [30, 9, 30, 9, 64, 64] float32 blocks per mode), with replab's scores on
  the same slice and the largest difference;
* ``report``: :func:`replab.circuits.report.component_report` on ``fact_recall`` prompt
  ``--prompt-index`` (other-prompt corruption, first-token scoring), per step and in total,
  plus the same with model loading (a fresh ``load_model`` + ``load_hf_model``);
Wall-clock and process CPU seconds (``time.process_time``, all threads) are both recorded:
on a shared machine the wall clock depends on the other jobs, the CPU time much less.

* ``gradient_precision``: the largest relative difference between the report's float32
  gradient norms and a float64 computation on the same HF weights (how many digits of a
  float32 gradient norm are meaningful on this model).

    .venv/bin/python bench/bench_heads.py --json runs/bench/heads.json
    .venv/bin/python bench/bench_heads.py --model tiny --skip-report     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bench_composition(model, repeats: int, tl_layers: int) -> dict:
    import torch
    from transformer_lens import utilities as utils

    from replab.heads.composition import composition_scores, composition_table, grams

    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        table, _ = composition_table(model, "all")
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    n = min(tl_layers, model.cfg.n_layers)
    left = grams(model, "ov_left")
    out = {"replab_seconds": [round(t, 2) for t in times], "replab_cpu_seconds": [round(t, 2) for t in cpu],
           "pairs_per_mode": int(len(table) // 3), "tl_layers": n, "tl_seconds": {}, "tl_cpu_seconds": {},
           "max_abs_diff": {}}
    mask = torch.arange(n)[:, None, None, None] < torch.arange(n)[None, None, :, None]
    for mode in ("Q", "K", "V"):
        right = {"Q": model.QK, "K": model.QK.T, "V": model.OV}[mode][:n]
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            ref = torch.where(mask, utils.composition_scores(model.OV[:n], right, broadcast_dims=True), 0.0)
        out["tl_seconds"][mode] = round(time.perf_counter() - t0, 2)
        out["tl_cpu_seconds"][mode] = round(time.process_time() - c0, 2)
        mine = composition_scores(model, mode.lower(), left)[:n, :, :n]
        out["max_abs_diff"][mode] = float((ref - mine).abs().max())
    return out


def bench_report(model_name, prompt_index: int) -> dict:
    from replab.circuits.report import component_report
    from replab.models import load_hf_model, load_model
    from replab.prompts import load_prompts

    t0 = time.perf_counter()
    model = load_model(model_name, device="cpu")
    hf = load_hf_model(model_name)
    loading = time.perf_counter() - t0
    rows = load_prompts("fact_recall", model.tokenizer).rows
    t0, c0 = time.perf_counter(), time.process_time()
    rep = component_report(model, rows, prompt_index, corruption="other-prompt", top=10, hf_model=hf)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    r = rep.report
    return {"prompt": r["prompt"]["text"], "target": r["target"]["text"], "seconds": r["seconds"],
            "report_seconds": round(total, 2), "report_cpu_seconds": round(cpu, 2),
            "loading_seconds": round(loading, 2),
            "with_loading_seconds": round(total + loading, 2),
            "candidates": [c["component"] for c in r["candidates"]], "model": model, "hf": hf,
            "rows": rows}


def gradient_precision(hf, model, rows, prompt_index: int) -> dict:
    import copy

    from replab.circuits.gradients import gradient_norms
    from replab.prompts import answer_ids, token_ids

    ids = token_ids(model.tokenizer, rows.prompt[prompt_index])
    tg = answer_ids(model.tokenizer, rows.answer[prompt_index])
    g32, _, _ = gradient_norms(hf, ids, tg)
    g64, _, _ = gradient_norms(copy.deepcopy(hf).double(), ids, tg)
    rel = {k: abs(g32[k] - g64[k]) / g64[k] for k in g32 if g64[k] > 0}
    worst = max(rel, key=rel.get)
    return {"max_rel_diff_float32_vs_float64": rel[worst], "parameter": worst,
            "median_rel_diff": float(sorted(rel.values())[len(rel) // 2])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default SmolLM2; 'tiny' for a smoke run (composition only)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tl-layers", type=int, default=10, help="layers for the TransformerLens comparison")
    ap.add_argument("--prompt-index", type=int, default=0)
    ap.add_argument("--skip-report", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import torch

    from replab.models import load_model

    torch.set_num_threads(args.threads)
    res = {"threads": args.threads, "load_average_start": os.getloadavg()}
    model = load_model(args.model, device="cpu")
    res["model"] = model.replab_identity.name
    res["composition"] = bench_composition(model, args.repeats, args.tl_layers)
    print(json.dumps({"composition": res["composition"]}, indent=1), flush=True)
    if not args.skip_report:
        rep = bench_report(args.model, args.prompt_index)
        res["gradient_precision"] = gradient_precision(rep.pop("hf"), rep.pop("model"), rep.pop("rows"),
                                                       args.prompt_index)
        res["report"] = rep
        print(json.dumps({k: res[k] for k in ("report", "gradient_precision")}, indent=1), flush=True)
    res["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
