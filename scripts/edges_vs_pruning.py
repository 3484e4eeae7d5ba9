"""The node-level view of edge circuits against a pruning circuit (issue 13's last acceptance item).

Reads a ``replab circuit discover`` run and a ``replab circuit prune`` run of the same task
and prints, for every discovered circuit (or those of ``--method``): its exact faithfulness,
how many heads it touches, and its overlap with the pruned circuit at ``--order`` /
``--threshold``, both over every touched head and over its heaviest heads (as many as the
pruned circuit has; :func:`replab.circuits.graph.node_view_overlap`)::

    python scripts/edges_vs_pruning.py runs/discover/next_day runs/circuits/nextday-prune
    python scripts/edges_vs_pruning.py runs/discover/sequences runs/circuits/seq-prune --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from replab.circuits.graph import node_view_overlap
from replab.io import inside, read_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("discover", help="a `replab circuit discover` run directory")
    ap.add_argument("prune", help="a `replab circuit prune` run directory")
    ap.add_argument("--order", default="greedy")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--method", default=None, help="only this method's circuits (eap, eap-ig, atp*)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    prune = read_json(inside(args.prune, "summary.json", "prune summary"), "prune summary")
    levels = [lv for lv in prune["levels"] if lv["order"] == args.order and lv["threshold"] == args.threshold]
    if not levels:
        raise SystemExit(f"error: {args.prune} has no {args.order} level at {args.threshold}")
    pruned = levels[0]["heads"]
    disc = read_json(inside(args.discover, "summary.json", "discover summary"), "discover summary")
    n_heads = int(disc["model"]["n_heads"])
    n_kv = int(disc["model"].get("n_kv_heads") or n_heads)
    if disc["task"]["content_hash"] != prune["task"]["content_hash"]:
        print(f"note: different tasks: {disc['task']['name']} (edges) vs {prune['task']['name']} (pruning)")
    print(f"pruning circuit ({args.order} >= {args.threshold:g}, performance {levels[0]['performance']:.3f}): "
          f"{', '.join(pruned)}")
    print("| method | edges | faithfulness | heads touched | pruned heads touched | Jaccard (touched) | "
          f"{len(pruned)} heaviest heads: shared | Jaccard (heaviest) | ranks of the pruned heads |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in disc["curve"]:
        if args.method and r["method"] != args.method:
            continue
        name = f"{r['method'].replace('*', 'star')}_{r['n_edges']}.json"
        circuit = read_json(inside(Path(args.discover) / "circuits", name, "circuit"), "circuit")
        v = node_view_overlap(circuit, pruned, n_heads, n_kv)
        ranks = [v["ranks_of_heads"][h] for h in sorted(pruned)]
        rows.append({"method": r["method"], "n_edges": r["n_edges"], "faithfulness": r["faithfulness"], **v})
        print(f"| {r['method']} | {r['n_edges']:,} | {r['faithfulness']:.3f} | {v['touched']['n_a']} | "
              f"{v['touched']['n_shared']}/{len(pruned)} | {v['touched']['jaccard']:.3f} | "
              f"{v['heaviest']['n_shared']}/{len(pruned)} | {v['heaviest']['jaccard']:.3f} | "
              f"{', '.join('-' if x is None else str(x) for x in ranks)} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"pruned": pruned, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
