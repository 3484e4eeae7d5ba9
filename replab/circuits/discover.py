"""From edge scores to circuits, each re-measured exactly (``replab circuit discover``).

For each method and each size ``k``: keep the ``k`` edges with the largest ``|score|``, patch
**every other edge** with its corrupt value (exactly, through the one experiment loop: one
variant per circuit, base = clean, :class:`~replab.patching.edge_patch.EdgePatch` es grouped by
receiver), and measure

    faithfulness = (M(edge circuit) − M_corrupt) / (M_clean − M_corrupt)

with a bootstrap CI. No circuit is ever reported from attribution alone. The same batch holds
the whole-graph checks of :func:`replab.circuits.edges.edge_check_variants` (the empty circuit
reproduces the corrupt run: faithfulness 0; the full graph, every edge from the clean run,
reproduces the clean run: 1).

A kept edge only matters if its sender is reachable from ``EMBED`` and its receiver reaches
``LOGITS`` through kept edges (otherwise the sender's output is its corrupt value anyway, or the
receiver's output is replaced downstream): :func:`effective_edges` finds those, and every
circuit reports both its nominal size and its effective size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from replab.circuits.eap import EdgeAttribution, attribute_edges
from replab.circuits.edges import edge_check_variants, edge_checks
from replab.circuits.graph import EdgeGraph, circuit_heads, edge_graph
from replab.errors import ReplabError
from replab.patching.engine import Variant

DEFAULT_SIZES = (50, 100, 200, 500, 1000, 2000, 5000)


def parse_sizes(spec) -> list[int]:
    """``"50,100,200"`` (or a list) -> sorted unique positive ints; ReplabError otherwise."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    try:
        sizes = sorted({int(str(x).strip()) for x in items if str(x).strip()})
    except ValueError:
        raise ReplabError(f"--edges takes circuit sizes such as 50,100,200, not {spec!r}") from None
    if not sizes or sizes[0] < 1:
        raise ReplabError(f"circuit sizes must be positive integers, not {spec!r}")
    return sizes


def effective_edges(graph: EdgeGraph, keep) -> np.ndarray:
    """Bool mask ``[n_edges]``: kept edges whose sender is reachable from EMBED and whose
    receiver reaches LOGITS through kept edges (module docstring)."""
    keep = np.asarray(keep, dtype=bool)
    s_of, r_of = graph.edge_sender, graph.edge_receiver
    n_s, n_r = len(graph.senders), len(graph.receivers)
    # receivers that make each sender's output: heads read q (own) and k/v (their KV group)
    feeds: dict[int, list[int]] = {s: [] for s in range(n_s)}
    sender_of = {("head", s[1], s[2]): i for i, s in enumerate(graph.senders) if s[0] == "head"}
    mlp_of = {s[1]: i for i, s in enumerate(graph.senders) if s[0] == "mlp"}
    for r, (kind, layer, _) in enumerate(graph.receivers):
        if kind == "mlp":
            feeds[mlp_of[layer]].append(r)
        elif kind in ("q", "k", "v"):
            for q in graph.query_heads(r):
                feeds[sender_of[("head", layer, q)]].append(r)
    active_s = np.zeros(n_s, bool)
    active_s[0] = True
    active_r = np.zeros(n_r, bool)
    for s in range(n_s):                      # senders are in topological order
        if s > 0:
            active_s[s] = bool(active_r[feeds[s]].any()) if feeds[s] else False
        hit = keep & (s_of == s)
        active_r[r_of[hit]] = True
    useful_r = np.zeros(n_r, bool)
    useful_r[n_r - 1] = True                   # LOGITS
    useful_s = np.zeros(n_s, bool)
    for s in range(n_s - 1, -1, -1):
        out = keep & (s_of == s)
        useful_s[s] = bool(useful_r[r_of[out]].any())
        if useful_s[s]:
            useful_r[feeds[s]] = True
    return keep & active_s[s_of] & useful_r[r_of]


@dataclass
class Discovery:
    """Circuits found by :func:`discover_circuits`.

    ``table``: one row per (method, size): ``method, n_edges, n_effective, faithfulness, ci_low,
    ci_high, n_heads, metric_after``. ``circuits``: ``{(method, k): dict}`` (JSON-ready, see
    :func:`circuit_json`). ``checks``: the plan's checks.
    """

    graph: EdgeGraph
    metric: str
    table: pd.DataFrame
    circuits: dict
    attributions: dict
    plan: dict
    seconds: dict = field(default_factory=dict)

    def smallest(self, threshold: float = 0.8) -> dict:
        """Per method, the smallest circuit whose faithfulness reaches ``threshold`` (or None)."""
        out = {}
        for method, rows in self.table.groupby("method", sort=False):
            hit = rows[rows["faithfulness"] >= threshold].sort_values("n_edges")
            out[method] = None if hit.empty else {k: _py(v) for k, v in hit.iloc[0].items()}
        return out


def _py(v):
    return v.item() if hasattr(v, "item") else v


def circuit_json(graph: EdgeGraph, order: np.ndarray, scores: np.ndarray, k: int, effective: np.ndarray,
                 row: dict) -> dict:
    """A circuit as JSON-ready data: size, exact faithfulness and CI, heads, nodes and edges
    (``edge, sender, receiver, score, effective``), strongest first."""
    keep = order[:k]
    names = graph.edge_names()
    sn, rn = graph.sender_names, graph.receiver_names
    edges = [{"edge": names[i], "sender": sn[graph.edge_sender[i]], "receiver": rn[graph.edge_receiver[i]],
              "score": float(scores[i]), "effective": bool(effective[i])} for i in keep]
    eff = keep[effective[keep]]
    nodes = sorted({e["sender"] for e in edges if e["effective"]} | {e["receiver"] for e in edges if e["effective"]})
    return {**{k2: _py(v) for k2, v in row.items()}, "heads": circuit_heads(graph, eff), "nodes": nodes,
            "edges": edges}


def discover_circuits(model, task, methods=("eap-ig",), sizes=DEFAULT_SIZES, *, steps: int = 5,
                      metric: str = "logit_diff", rule: str = "gauss-legendre", attributions: dict | None = None,
                      graddrop: bool = False,
                      progress: bool = False) -> Discovery:
    """Circuits of ``sizes`` edges for each method, each measured exactly (module docstring).

    Args:
        methods: attribution methods (``eap``, ``eap-ig``, ``atp*``) whose ranking builds circuits.
        sizes: numbers of kept edges (clipped to the graph's edge count).
        steps, rule: ``eap-ig``'s integration steps and rule (:func:`~replab.circuits.eap.ig_nodes`).
        attributions: ``{method: EdgeAttribution}`` to reuse (others are computed).
        graddrop: rank ``atp*`` circuits by its GradDrop magnitude instead of ``|AtP*|``.
    Returns:
        :class:`Discovery`.
    """
    from replab.patching.plan import run_plan

    graph = edge_graph(model)
    sizes = [min(int(k), graph.n_edges) for k in parse_sizes(sizes)]
    sizes = sorted(set(sizes))
    methods = [{"atp-star": "atp*", "atpstar": "atp*"}.get(m, m) for m in methods]
    atts = dict(attributions or {})
    seconds = {}
    for m in methods:
        if m not in atts:
            atts[m] = attribute_edges(model, task, m, steps=steps, metric=metric, rule=rule,
                                      graddrop=graddrop and m == "atp*", progress=progress)
        seconds[f"attribution_{m}"] = round(atts[m].seconds, 3)
    rankings = {m: _ranking(atts[m], graddrop) for m in methods}
    variants = []
    for m in methods:
        order = np.argsort(-np.abs(rankings[m]), kind="stable")
        for k in sizes:
            variants.append(Variant(graph.patches(order[k:], "corrupt"), name=f"{m}@{k}", group=m,
                                    info={"method": m, "n_edges": k}))
    t0 = time.time()
    res = run_plan(model, task, variants + edge_check_variants(graph), metric, base="clean",
                   extra_checks=edge_checks, progress=progress, label="edge circuits", unit="circuit")
    seconds["exact"] = round(time.time() - t0, 3)
    rows, circuits = [], {}
    for m in methods:
        order = np.argsort(-np.abs(rankings[m]), kind="stable")
        for k in sizes:
            i = res.index(f"{m}@{k}")
            keep = np.zeros(graph.n_edges, bool)
            keep[order[:k]] = True
            eff = effective_edges(graph, keep)
            row = {"method": m, "n_edges": k, "n_effective": int(eff.sum()),
                   "faithfulness": float(res.effect[i]), "ci_low": float(res.ci_low[i]),
                   "ci_high": float(res.ci_high[i]), "metric_after": float(res.patched[i].mean()),
                   "n_heads": len(circuit_heads(graph, np.flatnonzero(eff)))}
            rows.append(row)
            circuits[(m, k)] = circuit_json(graph, order, atts[m].scores, k, eff, row)
    plan = res.describe()
    return Discovery(graph, metric, pd.DataFrame(rows), circuits, atts, plan, seconds)


def _ranking(att: EdgeAttribution, graddrop: bool) -> np.ndarray:
    if graddrop and "graddrop" in att.extra:
        return att.extra["graddrop"]
    return att.scores
