"""Benchmark: edge attribution and exact edge patching on the default model (next_day task).

Side by side in one process, on the same inputs:

* ``forward``: one plain forward of the clean prompts (full logits), the unit of cost;
* ``eap``: :func:`replab.circuits.eap.attribute_edges` over every edge of the graph (one corrupt
  forward, one clean forward, one backward): time, forward-equivalents (its time / one forward),
  edges per second;
* ``eap_ig``: EAP-IG with ``--steps`` steps (about ``steps`` × EAP);
* ``exact``: the verification sample (top 50 by |EAP| + 200 random, seeded) patched exactly,
  batched in the engine: once through :func:`replab.circuits.edges.exact_edges` (``run_plan``:
  engine and whole-graph checks, bootstrap CIs), once as the bare engine call;
* ``tl_loop``: the same edges, one TransformerLens forward with one hook per edge (split q/k/v
  inputs on, the sender difference added at the receiver; the clean/corrupt caches it needs are
  included in its time). The largest difference between its per-prompt metrics and the engine's
  is printed: speed and agreement come from the same run.

    .venv/bin/python bench/bench_edges.py --json runs/bench/edges.json
    .venv/bin/python bench/bench_edges.py --model tiny --tl-edges 50       # smoke run

Every timing is taken twice: wall seconds and CPU seconds of this process
(``time.process_time``). On a machine shared with other jobs the wall times stretch with
the load while the CPU seconds do not (with ``--threads 1`` they are the work itself), so
the ratios are reported on CPU seconds (wall ratios beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECEIVER_HOOK = {"q": "blocks.{}.hook_q_input", "k": "blocks.{}.hook_k_input", "v": "blocks.{}.hook_v_input",
                 "mlp": "blocks.{}.hook_mlp_in", "logits": "blocks.{}.hook_resid_post"}


def _best(fn, repeats):
    """``(wall s, cpu s, result)``: the fastest of ``repeats`` calls (each clock's own minimum)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default SmolLM2; 'tiny' for a smoke run")
    ap.add_argument("--task", default="next_day")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="best of N for forward / EAP / EAP-IG")
    ap.add_argument("--tl-edges", type=int, default=None, help="time the TransformerLens loop on the first N "
                                                             "sampled edges only (default: all)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import numpy as np
    import torch

    from replab.circuits.eap import attribute_edges
    from replab.circuits.edges import exact_edges, sample_edges
    from replab.patching.edge_patch import edge_mode, sender_value
    from replab.patching.engine import Variant, run_variants
    from replab.patching.runs import load

    torch.set_num_threads(args.threads)
    model, task = load(args.model, args.task)
    from replab.circuits.graph import edge_graph

    graph = edge_graph(model)
    info = {"model": model.cfg.model_name, "task": task.describe(), "threads": args.threads,
            "n_edges": graph.n_edges, "steps": args.steps}

    info["load_average_start"] = list(os.getloadavg())
    with torch.inference_mode():
        model(task.clean)                                   # warm-up
        w_fwd, t_fwd, _ = _best(lambda: model(task.clean), max(5, args.repeats))
    info["forward"] = {"wall_s": w_fwd, "cpu_s": t_fwd}
    w_eap, t_eap, eap = _best(lambda: attribute_edges(model, task, "eap"), args.repeats)
    info["eap"] = {"wall_s": w_eap, "cpu_s": t_eap, "forward_equivalents": t_eap / t_fwd,
                   "forward_equivalents_wall": w_eap / w_fwd, "edges_per_cpu_s": graph.n_edges / t_eap,
                   "edges_per_wall_s": graph.n_edges / w_eap, "passes": eap.passes}
    w_ig, t_ig, ig = _best(lambda: attribute_edges(model, task, "eap-ig", steps=args.steps), args.repeats)
    info["eap_ig"] = {"wall_s": w_ig, "cpu_s": t_ig, "ratio_to_eap": t_ig / t_eap, "ratio_to_eap_wall": w_ig / w_eap,
                      "forward_equivalents": t_ig / t_fwd, "passes": ig.passes}

    pick, _ = sample_edges(eap.scores, 50, 200, seed=0)
    w_plan, t_plan, (table, res) = _best(lambda: exact_edges(model, task, graph, pick), 1)
    variants = [Variant(graph.patches([i])) for i in pick]
    w_engine, t_engine, _ = _best(lambda: run_variants(model, task.clean, task.corrupt, variants, base="clean"), 1)
    info["exact"] = {"n_edges": int(len(pick)), "run_plan_cpu_s": t_plan, "engine_cpu_s": t_engine,
                     "run_plan_wall_s": w_plan, "engine_wall_s": w_engine,
                     "checks": {k: c.value for k, c in res.checks.items()}}

    n_tl = len(pick) if args.tl_edges is None else min(args.tl_edges, len(pick))
    ans, foil = task.answer[:, None], task.foil[:, None]
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), edge_mode(model):
        _, clean_c = model.run_with_cache(task.clean)
        _, corrupt_c = model.run_with_cache(task.corrupt)
        from replab.patching.edge_patch import sender_hook

        tl = []
        for i in pick[:n_tl]:
            s = graph.senders[graph.edge_sender[i]]
            kind, layer, head = graph.receivers[graph.edge_receiver[i]]
            hook = sender_hook(s)
            delta = sender_value(model, corrupt_c[hook], s) - sender_value(model, clean_c[hook], s)

            def add(act, hook, delta=delta, head=head):
                act = act.clone()
                if head is None:
                    act += delta
                else:
                    act[:, :, head] += delta
                return act

            last = model.run_with_hooks(task.clean, fwd_hooks=[(RECEIVER_HOOK[kind].format(layer), add)])[:, -1]
            tl.append((last.gather(1, ans) - last.gather(1, foil))[:, 0].numpy())
    w_tl, t_tl = time.perf_counter() - t0, time.process_time() - c0
    diff = float(np.abs(np.stack(tl) - res.patched[:n_tl]).max())
    per_edge_tl, per_edge_wall = t_tl / n_tl, w_tl / n_tl
    info["tl_loop"] = {"n_edges": n_tl, "cpu_s": t_tl, "wall_s": w_tl, "cpu_s_per_edge": per_edge_tl,
                       "cpu_s_for_all_sampled": per_edge_tl * len(pick),
                       "speedup_engine": per_edge_tl * len(pick) / t_engine,
                       "speedup_run_plan": per_edge_tl * len(pick) / t_plan,
                       "speedup_engine_wall": per_edge_wall * len(pick) / w_engine,
                       "speedup_run_plan_wall": per_edge_wall * len(pick) / w_plan,
                       "max_abs_metric_diff_vs_engine": diff}
    info["load_average_end"] = list(os.getloadavg())

    print(f"model {info['model']}, task {task.name} ({task.n_prompts} prompts x {task.n_tokens} tokens), "
          f"{graph.n_edges:,} edges, {args.threads} threads; load average {info['load_average_start'][0]:.1f} -> "
          f"{info['load_average_end'][0]:.1f}; CPU seconds (wall in brackets)")
    print(f"one forward: {t_fwd:.3f} s ({w_fwd:.3f})")
    e = info["eap"]
    print(f"EAP, every edge: {t_eap:.2f} s ({w_eap:.2f}) = {e['forward_equivalents']:.2f} forward-equivalents "
          f"({e['forward_equivalents_wall']:.2f}); {eap.passes['forwards']} forwards + {eap.passes['backwards']} "
          f"backward; {e['edges_per_cpu_s']:,.0f} edges per CPU second ({e['edges_per_wall_s']:,.0f} per wall s)")
    print(f"EAP-IG {args.steps} steps: {t_ig:.2f} s ({w_ig:.2f}) = {info['eap_ig']['ratio_to_eap']:.2f} x EAP "
          f"({info['eap_ig']['ratio_to_eap_wall']:.2f})")
    print(f"exact, {len(pick)} edges batched: run_plan {t_plan:.2f} s ({w_plan:.2f}; with checks and CIs), "
          f"engine {t_engine:.2f} s ({w_engine:.2f})")
    t = info["tl_loop"]
    print(f"TransformerLens loop, one forward per edge: {t_tl:.2f} s ({w_tl:.2f}) for {n_tl} edges "
          f"({per_edge_tl:.3f} s/edge; {t['cpu_s_for_all_sampled']:.1f} s for {len(pick)}): engine "
          f"{t['speedup_engine']:.1f}x faster ({t['speedup_engine_wall']:.1f}x wall), run_plan "
          f"{t['speedup_run_plan']:.1f}x ({t['speedup_run_plan_wall']:.1f}x); max |metric diff| {diff:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(info, indent=1, default=float))


if __name__ == "__main__":
    main()
