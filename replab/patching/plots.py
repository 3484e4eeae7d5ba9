"""Figures for patching and attribution: heatmaps, head scatters, attention patterns.

Every function takes tidy tables and returns a matplotlib Figure (titled, labelled axes);
callers save PNG + SVG with :func:`save_figure`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from replab._figures import pyplot


def save_figure(fig, path_stem: Path) -> list[str]:
    """Write ``<stem>.png`` and ``<stem>.svg``; returns the paths."""
    from replab._figures import save

    return [str(p) for p in save(fig, Path(path_stem), formats=("png", "svg"))]


def _heat(ax, grid: pd.DataFrame, title: str, xlabel: str, ylabel: str, value_label: str,
          annotate: bool = False):
    import seaborn as sns

    vmax = float(np.nanmax(np.abs(grid.values))) if grid.size else 1.0
    sns.heatmap(grid, ax=ax, cmap="RdBu", center=0.0, vmin=-max(vmax, 1e-6), vmax=max(vmax, 1e-6),
                annot=annotate, fmt=".2f", annot_kws={"fontsize": 6},
                cbar_kws={"label": value_label})
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def sweep_heatmap(table: pd.DataFrame, title: str, value: str = "normalized_effect"):
    """Layer × position (token labels), layer × head, or one layer × position panel per head."""
    plt = pyplot()
    has_pos = table["position"].notna().any()
    has_head = table["head"].notna().any()
    label = "normalised effect (0 = corrupt, 1 = clean)" if value == "normalized_effect" else value
    if has_head and has_pos:
        heads = sorted(table["head"].dropna().unique())
        cols = min(3, len(heads))
        rows = int(np.ceil(len(heads) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.16 * table["layer"].nunique() * rows + 2),
                                 squeeze=False)
        for ax, h in zip(axes.flat, heads, strict=False):
            sub = table[table["head"] == h]
            grid = sub.pivot(index="layer", columns="token", values=value)
            grid = grid[sorted(grid.columns, key=lambda t: int(str(t).split(":")[0]))]
            _heat(ax, grid, f"head {int(h)}", "position: token", "layer", label)
        for ax in list(axes.flat)[len(heads):]:
            ax.axis("off")
        fig.suptitle(title)
        fig.tight_layout()
        return fig
    if has_head:
        grid = table.pivot(index="layer", columns="head", values=value)
        xlabel = "KV head" if table["query_heads"].notna().any() else "head"
    elif has_pos:
        grid = table.pivot(index="layer", columns="token", values=value)
        grid = grid[sorted(grid.columns, key=lambda t: int(str(t).split(":")[0]))]
        xlabel = "position: token"
    else:
        grid = table.set_index("layer")[[value]].rename(columns={value: "all positions"})
        xlabel = ""
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * grid.shape[1] + 1.5, 0.22 * grid.shape[0] + 1.6))
    _heat(ax, grid, title, xlabel, "layer", label, annotate=grid.shape[1] <= 12)
    fig.tight_layout()
    return fig


def head_scatter(z: pd.DataFrame, other: pd.DataFrame, other_name: str, title: str, n_heads: int,
                 n_kv_heads: int, label_top: int = 6):
    """Scatter of each head's output-patch effect against its value- or pattern-patch effect.

    For ``v`` (one value per KV head) each query head is paired with the effect of its KV
    head, which it shares with the other query heads of its group.
    """
    plt = pyplot()
    zz = z.set_index(["layer", "head"])["normalized_effect"]
    group = n_heads // n_kv_heads
    xs, ys, labels = [], [], []
    for (layer, h), zv in zz.items():
        key = (layer, h // group) if other_name == "v" else (layer, h)
        ov = other.set_index(["layer", "head"])["normalized_effect"].get(key)
        if ov is None:
            continue
        xs.append(zv), ys.append(ov), labels.append(f"L{layer}H{h}")
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.scatter(xs, ys, s=14, alpha=0.75)
    lim = [min(xs + ys + [0]) - 0.05, max(xs + ys + [0]) + 0.05]
    ax.plot(lim, lim, color="grey", lw=0.7, ls="--", label="y = x")
    order = np.argsort(-np.abs(np.asarray(xs)))[:label_top]
    for i in order:
        ax.annotate(labels[i], (xs[i], ys[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("output (z) patch: normalised effect")
    ax.set_ylabel(f"{'value (v, KV head)' if other_name == 'v' else 'pattern'} patch: normalised effect")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    return fig


def attention_patterns(patterns: dict, tokens: list[str], title: str, groups: dict | None = None,
                       labels: dict | None = None):
    """One panel per head: its attention pattern (dest × src) averaged over prompts.

    With ``groups`` (head -> ``early``/``middle``/``late``) the panels are laid out one row
    per group, in layer order; ``labels`` adds a note to a head's panel title (e.g. its DLA).
    """
    plt = pyplot()
    import seaborn as sns

    names = list(patterns)
    if groups:
        order = [g for g in ("early", "middle", "late") if any(groups.get(n) == g for n in names)]
        grid = [[n for n in names if groups.get(n) == g] for g in order]
    else:
        per = min(3, len(names)) or 1
        grid = [names[i:i + per] for i in range(0, len(names), per)] or [[]]
    rows, cols = len(grid), max(1, max(len(r) for r in grid))
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.6 * rows), squeeze=False)
    for r, row in enumerate(grid):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            name = row[c]
            sns.heatmap(patterns[name], ax=ax, cmap="Blues", vmin=0, vmax=1, xticklabels=tokens,
                        yticklabels=tokens, cbar_kws={"label": "attention"})
            g = f" ({groups[name]} layers)" if groups and name in groups else ""
            note = f"\n{labels[name]}" if labels and name in labels else ""
            ax.set_title(f"{name}{g}{note}", fontsize=9)
            ax.set_xlabel("source token")
            ax.set_ylabel("destination token")
            ax.tick_params(labelsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _finish_zero_line(fig, ax, title: str, xlabel: str, ylabel: str):
    """Add a thin grey line at y = 0, the labels (after seaborn, which sets its own) and the
    title; returns ``fig``."""
    ax.axhline(0, color="grey", lw=0.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def dla_line(table: pd.DataFrame, title: str):
    """Accumulated-residual DLA: logit difference against depth, clean and corrupt."""
    import seaborn as sns

    fig, ax = pyplot().subplots(figsize=(8, 3.6))
    sns.lineplot(table, x="depth", y="logit_diff", hue="run", marker="o", ax=ax, errorbar=("ci", 95))
    return _finish_zero_line(fig, ax, title, "layer (x.5 = after attention, resid_mid)",
                             "logit difference (answer − foil)")


def dla_layers(table: pd.DataFrame, title: str):
    """Per-layer DLA: attention and MLP contributions by layer."""
    import seaborn as sns

    fig, ax = pyplot().subplots(figsize=(9, 3.6))
    sns.barplot(table, x="layer", y="logit_diff", hue="component", ax=ax, errorbar=None)
    ax.tick_params(axis="x", labelsize=7)
    return _finish_zero_line(fig, ax, title, "layer", "direct effect on logit difference")
