"""Figures of the circuit commands. Each function takes tidy data and returns a titled,
labelled matplotlib Figure; runs save it as PNG + SVG with
:func:`replab.patching.plots.save_figure`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab._figures import pyplot as _plt

EFFECT = "normalised effect (1 = intact, 0 = corrupt run)"


def baseline_histogram(value: float, randoms, title: str, xlabel: str = EFFECT):
    """The random sets' values as a histogram, the set's own as a vertical line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.4, 3.4))
    r = np.asarray(list(randoms), dtype=float)
    if r.size:
        ax.hist(r, bins=min(20, max(5, r.size // 2)), color="0.7", label=f"{r.size} random sets")
    ax.axvline(value, color="C3", lw=2, label="the set")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("random sets")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def minimality_bars(records: list[dict], title: str):
    """Per member: the drop of the set's effect without it (with CI) and the random members' p95."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(records) + 2), 3.6))
    x = np.arange(len(records))
    d = np.array([r["delta"] for r in records])
    lo = np.array([r["delta_ci_low"] for r in records])
    hi = np.array([r["delta_ci_high"] for r in records])
    ax.bar(x, d, color="C0", yerr=np.vstack([d - lo, hi - d]), capsize=3, label="drop without the member (95% CI)")
    ax.scatter(x, [r["random_p95"] for r in records], color="C3", marker="_", s=200, label="random members, p95")
    ax.axhline(0, color="0.3", lw=0.7)
    ax.set_xticks(x, [r["components"][0] for r in records], rotation=60, fontsize=7)
    ax.set_xlabel("member")
    ax.set_ylabel("effect with − effect without")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _effect_heatmap(grid: pd.DataFrame, title: str, xlabel: str, ylabel: str, figsize, annot: bool = True):
    """A heatmap of normalised effects on the one scale every circuit figure uses (0 = corrupt /
    ablated, 1 = clean, centred at 0.5)."""
    import seaborn as sns

    fig, ax = _plt().subplots(figsize=figsize)
    sns.heatmap(grid, ax=ax, cmap="RdBu", center=0.5, vmin=-0.25, vmax=1.25, annot=annot, fmt=".2f",
                annot_kws={"fontsize": 6}, cbar_kws={"label": EFFECT})
    ax.tick_params(axis="y", rotation=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def blocks_heatmap(table: pd.DataFrame, title: str):
    """Rows: test (necessity / sufficiency) × layer; columns: component."""
    t = table.assign(row=table["test"] + " L" + table["layer"].astype(str))
    order = list(dict.fromkeys(table["block"]))
    grid = t.pivot_table(index="row", columns="block", values="normalized_effect", aggfunc="mean")
    grid = grid[[c for c in order if c in grid.columns]]
    return _effect_heatmap(grid, title, "component at the layer", "test, layer",
                           (0.55 * grid.shape[1] + 3, 0.45 * grid.shape[0] + 1.8))


def hydra_bars(table: pd.DataFrame, title: str, top: int = 12):
    """The heads whose direct effect rises most after the ablation: clean vs ablated DLA."""
    plt = _plt()
    t = table.sort_values("compensation", ascending=False).head(top)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * len(t) + 2), 3.6))
    x = np.arange(len(t))
    ax.bar(x - 0.2, t["dla_clean"], width=0.4, color="0.6", label="clean run")
    ax.bar(x + 0.2, t["dla_ablated"], width=0.4, color="C1", label="after the ablation")
    ax.axhline(0, color="0.3", lw=0.7)
    ax.set_xticks(x, t["head"], rotation=60, fontsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("direct effect on logit(answer) − logit(foil)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def path_heatmap(table: pd.DataFrame, n_layers: int, n_heads: int, title: str):
    """Senders' path-patching effect as a layer × head grid (1 − normalised effect: the drop)."""
    import seaborn as sns

    plt = _plt()
    grid = np.full((n_layers, n_heads), np.nan)
    for r in table.itertuples():
        if r.sender_layer is not None and not pd.isna(r.sender_layer) and r.sender_head is not None \
                and not pd.isna(r.sender_head):
            grid[int(r.sender_layer), int(r.sender_head)] = 1 - r.normalized_effect
    fig, ax = plt.subplots(figsize=(0.45 * n_heads + 2.5, 0.22 * n_layers + 1.5))
    vmax = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    sns.heatmap(pd.DataFrame(grid), ax=ax, cmap="RdBu_r", center=0, vmin=-vmax, vmax=vmax,
                cbar_kws={"label": "drop: 1 − normalised effect"})
    ax.set_xlabel("sender head")
    ax.set_ylabel("sender layer")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def pareto(curves: pd.DataFrame, levels: pd.DataFrame, title: str):
    """Performance against heads kept, one line per order; the re-measured levels as dots."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (order, sub) in enumerate(curves.groupby("order", sort=False)):
        random = str(order).startswith("random")
        ax.plot(sub["n_heads"], sub["performance"], lw=0.8 if random else 1.6,
                color="0.6" if random else f"C{i % 10}", alpha=0.6 if random else 1.0,
                label=None if random and str(order) != "random0" else ("random orders" if random else order))
    if len(levels):
        ax.scatter(levels["n_heads"], levels["performance"], color="k", s=12, zorder=5, label="levels (re-measured)")
    for th in sorted(set(levels["threshold"])) if len(levels) else []:
        ax.axhline(th, color="0.8", lw=0.6, ls="--")
    ax.set_xlabel("heads kept")
    ax.set_ylabel("performance (ablated metric / intact metric)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def survival_heatmap(freq: pd.DataFrame, n_layers: int, n_heads: int, title: str):
    """How often each head survives across orders (per threshold: columns of panels)."""
    import seaborn as sns

    plt = _plt()
    ths = sorted(freq["threshold"].unique(), reverse=True)
    fig, axes = plt.subplots(1, len(ths), figsize=(3.2 * len(ths) + 1, 0.2 * n_layers + 1.8), squeeze=False)
    for ax, th in zip(axes[0], ths, strict=True):
        grid = np.zeros((n_layers, n_heads))
        for r in freq[freq["threshold"] == th].itertuples():
            grid[int(r.layer), int(r.head_index)] = r.survival
        sns.heatmap(pd.DataFrame(grid), ax=ax, cmap="viridis", vmin=0, vmax=1, cbar=ax is axes[0][-1],
                    cbar_kws={"label": "fraction of orders that keep the head"})
        ax.set_title(f"threshold {th:g}")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def grid_heatmap(by_class: pd.DataFrame, title: str):
    """A grid run's normalised effects: rows = class (of the clean prompts), columns = test ×
    component (× layer)."""
    t = by_class.assign(column=by_class["test"] + " " + by_class["block"].astype(str)
                        + by_class["layer"].map(lambda x: "" if x is None or pd.isna(x) else f" L{int(x)}"))
    grid = t.pivot_table(index="class", columns="column", values="normalized_effect", aggfunc="mean")
    return _effect_heatmap(grid, title, "test, component", "class (clean prompts)",
                           (0.5 * grid.shape[1] + 3.5, 0.5 * grid.shape[0] + 2.5), annot=grid.shape[1] <= 30)
