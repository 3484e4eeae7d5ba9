"""Figures for edge attribution and edge circuits (matplotlib; callers save PNG + SVG).

* :func:`approx_vs_exact`: each sampled edge's attribution score against its exact score, the
  sign disagreements marked;
* :func:`faithfulness_curve`: exact faithfulness against the number of kept edges, one line
  (with its CI band) per method;
* :func:`circuit_figure`: a layered drawing of one circuit: EMBED on the left, one column per
  layer (its query heads, then its MLP), LOGITS on the right; q edges solid, k edges dashed,
  v edges dotted (k/v edges end at the middle head of their KV group), colour = sign of the
  score, width = |score|; edges that cannot matter (see
  :func:`replab.circuits.discover.effective_edges`) faint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab._figures import pyplot as _plt


def approx_vs_exact(sample: pd.DataFrame, method: str, title: str = ""):
    """Scatter of ``score`` against ``exact`` for the sampled edges (``sampled`` column: top /
    random / chosen), with the diagonal; returns the Figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    flip = (np.sign(sample["score"]) != np.sign(sample["exact"])) & (sample["score"] != 0) & (sample["exact"] != 0)
    for reason, marker in (("top", "o"), ("random", "."), ("chosen", "s")):
        sub = sample[(sample["sampled"] == reason) & ~flip]
        if len(sub):
            ax.scatter(sub["exact"], sub["score"], s=14, marker=marker, alpha=0.75, label=f"{reason} ({len(sub)})")
    if flip.any():
        sub = sample[flip]
        ax.scatter(sub["exact"], sub["score"], s=28, marker="x", color="crimson",
                   label=f"sign differs ({len(sub)})")
    lo = float(np.nanmin([sample["exact"].min(), sample["score"].min()]))
    hi = float(np.nanmax([sample["exact"].max(), sample["score"].max()]))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label="y = x")
    ax.axhline(0, color="black", lw=0.4)
    ax.axvline(0, color="black", lw=0.4)
    ax.set_xlabel("exact edge patching: (M_patched − M_clean) / (M_clean − M_corrupt)")
    ax.set_ylabel(f"{method} estimate (same units)")
    ax.set_title(title or f"{method} vs exact edge patching")
    ax.legend(fontsize=7, loc="best")
    return fig


def faithfulness_curve(table: pd.DataFrame, title: str = "", target: float | None = 0.8):
    """Faithfulness (exact) against kept edges, one line per method, CI bands; returns the Figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for method, rows in table.groupby("method", sort=False):
        rows = rows.sort_values("n_edges")
        ax.plot(rows["n_edges"], rows["faithfulness"], marker="o", ms=3.5, label=method)
        ax.fill_between(rows["n_edges"], rows["ci_low"], rows["ci_high"], alpha=0.18)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="clean run (1)")
    ax.axhline(0.0, color="black", lw=0.5, label="corrupt run (0)")
    if target is not None:
        ax.axhline(target, color="tab:green", lw=0.8, ls=":", label=f"target {target:g}")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (every other edge patched from the corrupt run)")
    ax.set_ylabel("faithfulness (M_circuit − M_corrupt) / (M_clean − M_corrupt)")
    ax.set_title(title or "edge circuits: exact faithfulness")
    ax.legend(fontsize=7)
    return fig


def _layout(n_layers: int, n_heads: int):
    """Node positions: sender name -> (x, y)."""
    mid = (n_heads - 1) / 2
    pos = {"EMBED": (-1.0, mid), "LOGITS": (float(n_layers), mid)}
    for layer in range(n_layers):
        for h in range(n_heads):
            pos[f"L{layer}H{h}"] = (layer, h)
        pos[f"L{layer}MLP"] = (layer + 0.5, -1.5)
    return pos


def _target(receiver: str, n_heads: int, n_kv: int) -> tuple[str, str]:
    """(node drawn at, line style) for a receiver name."""
    if receiver == "LOGITS" or receiver.endswith("MLP"):
        return receiver, "-"
    node, kind = receiver.rsplit(".", 1)
    if kind == "q":
        return node, "-"
    layer, g = node[1:].split("KV")
    group = n_heads // n_kv
    return f"L{layer}H{int(g) * group + group // 2}", "--" if kind == "k" else ":"


def circuit_figure(circuit: dict, n_layers: int, n_heads: int, n_kv_heads: int, title: str = "",
                   max_edges: int = 400):
    """Layered drawing of a circuit (``circuit_json`` data); at most ``max_edges`` edges, the
    strongest, are drawn (the title says so). Returns the Figure."""
    plt = _plt()
    pos = _layout(n_layers, n_heads)
    edges = sorted(circuit["edges"], key=lambda e: -abs(e["score"]))
    drawn = edges[:max_edges]
    top = max((abs(e["score"]) for e in drawn), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(min(26, 2 + 0.55 * n_layers), 2.2 + 0.45 * n_heads))
    for e in reversed(drawn):
        a = pos[e["sender"]]
        node, style = _target(e["receiver"], n_heads, n_kv_heads)
        b = pos[node]
        color = "tab:blue" if e["score"] >= 0 else "tab:red"
        alpha = 0.75 if e["effective"] else 0.12
        ax.plot([a[0], b[0]], [a[1], b[1]], ls=style, color=color, alpha=alpha,
                lw=0.3 + 2.7 * abs(e["score"]) / top)
    used = {e["sender"] for e in drawn} | {_target(e["receiver"], n_heads, n_kv_heads)[0] for e in drawn}
    for name, (x, y) in pos.items():
        on = name in used
        ax.scatter([x], [y], s=22 if on else 5, color="black" if on else "lightgrey", zorder=3)
        if on and (name in ("EMBED", "LOGITS") or name.endswith("MLP") or len(used) <= 60):
            ax.annotate(name, (x, y), fontsize=5, xytext=(2, 2), textcoords="offset points")
    ax.set_xticks(range(-1, n_layers + 1))
    ax.set_xticklabels(["EMBED"] + [str(k) for k in range(n_layers)] + ["LOGITS"], fontsize=6, rotation=90)
    ax.set_yticks(list(range(n_heads)) + [-1.5])
    ax.set_yticklabels([f"H{h}" for h in range(n_heads)] + ["MLP"], fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel("query head (MLPs on the bottom row)")
    n_eff = sum(e["effective"] for e in circuit["edges"])
    shown = f"; {len(drawn)} strongest drawn" if len(drawn) < len(edges) else ""
    ax.set_title(title or (f"{circuit.get('method', '')} circuit: {len(edges)} edges ({n_eff} effective{shown}), "
                           f"faithfulness {circuit.get('faithfulness', float('nan')):.3f}\n"
                           "blue + / red −; q solid, k dashed, v dotted (to the KV group's middle head); "
                           "faint: cannot matter"), fontsize=8)
    return fig
