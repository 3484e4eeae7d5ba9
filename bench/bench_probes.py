"""Benchmark: a 30-layer probe sweep, 5-fold grouped CV, 5,000 rows x 576 dims.

Run: ``.venv/bin/python bench/bench_probes.py --skip-full --threads 2``. Writes a
synthetic store (planted rank-2 signal, 1,000 entities x 5 templates; see
``replab.store.synthetic``) once under ``runs/bench/probe_store_*``, then times
``replab.probes.train_probes`` (``--threads N``: N layers swept in parallel):

* ``core``: logistic (L2 chosen by nested CV over 3 strengths, plus the doubly held-out
  template split) + mean-diff, every layer, 5 outer folds - the issue's target is
  <= 60 s on CPU;
* ``full``: the same plus what ``replab probe train`` does by default: control task,
  shuffled-label baseline, doubly held-out templates, LEACE on every fold.

Prints a table and writes ``runs/bench/probes.json``. All numbers are measured now.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "runs" / "bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1,
                    help="layers swept in parallel, one CPU thread each (ProbeConfig.threads)")
    ap.add_argument("--skip-full", action="store_true", help="time only the core sweep")
    args = ap.parse_args()

    from replab.probes import ProbeConfig, train_probes
    from replab.store.synthetic import write_synthetic_store

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"probe_store_{args.rows}x{args.dim}x{args.layers}"
    t = time.perf_counter()
    store = write_synthetic_store(path, n_rows=args.rows, d=args.dim, n_layers=args.layers,
                                  n_classes=5, rank=2, signal=2.0, n_templates=5,
                                  entity_scale=1.0, noise=1.0, seed=0)
    made = time.perf_counter() - t
    results = {"rows": args.rows, "dim": args.dim, "layers": args.layers, "folds": 5,
               "threads": args.threads, "cpus": os.cpu_count(), "store_seconds": round(made, 2),
               "load_average_at_start": os.getloadavg()[0]}
    runs = [("core", dict(kinds=("logistic", "meandiff"), controls=False, erase=False))]
    if not args.skip_full:
        runs.append(("full", dict(kinds=("logistic", "meandiff"), controls=True, erase=True)))
    for name, kw in runs:
        cfg = ProbeConfig(label="label", folds=5, threads=args.threads, **kw)
        t, cpu = time.perf_counter(), time.process_time()
        run = train_probes(store, config=cfg, progress=False)
        secs, cpu = time.perf_counter() - t, time.process_time() - cpu
        logistic = run.records[run.records["kind"] == "logistic"]
        best = logistic[logistic["layer"] == run.best_layer].iloc[0]
        results[name] = {"seconds": round(secs, 2), "cpu_seconds": round(cpu, 2), "best_layer": run.best_layer,
                         "best_balanced_accuracy": round(float(best["balanced_accuracy"]), 4),
                         "load_average_after": os.getloadavg()[0],
                         "logistic_balanced_accuracy_by_layer": [round(float(v), 4) for v in (
                             logistic.sort_values("layer")["balanced_accuracy"])]}
        print(f"[{name}] {secs:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    print(f"probe sweep benchmark: {args.layers} layers, {args.rows} rows x {args.dim} dims, "
          f"5-fold grouped CV, {args.threads} thread(s), load avg {results['load_average_at_start']:.1f}")
    for name in ("core", "full"):
        if name in results:
            r = results[name]
            target = "  (target <= 60 s)" if name == "core" else ""
            print(f"  {name:5s} {r['seconds']:8.1f} s wall ({r['cpu_seconds']:.1f} s CPU)   "
                  f"best layer {r['best_layer']}, "
                  f"logistic balanced acc {r['best_balanced_accuracy']:.3f}{target}")
    (OUT / "probes.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
