"""Figures for head analyses: layer × head heatmaps, token × token circuit matrices, and
sender × receiver composition maps. Each function returns a titled matplotlib Figure with
labelled axes; callers save PNG + SVG with :func:`replab._figures.save`.
(Attention-pattern figures are W2's :func:`replab.patching.plots.attention_patterns`.)"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab._figures import pyplot as _plt


def layer_head_heatmap(table: pd.DataFrame, value: str, title: str, label: str,
                       xlabel: str = "query head", center: float | None = None):
    """Layer (rows) × head (columns) heatmap of ``table[value]``."""
    import seaborn as sns

    plt = _plt()
    grid = table.pivot(index="layer", columns="head", values=value)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * grid.shape[1] + 1.5, 0.24 * grid.shape[0] + 1.6))
    kw = {"cmap": "RdBu", "center": center} if center is not None else {"cmap": "viridis"}
    sns.heatmap(grid, ax=ax, annot=grid.shape[1] <= 12, fmt=".2f", annot_kws={"fontsize": 6},
                cbar_kws={"label": label}, **kw)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    fig.tight_layout()
    return fig


def matrix_panels(frames: dict[str, pd.DataFrame], title: str, row_label: str, col_label: str,
                  value_label: str, mark=None):
    """One panel per head: a token × token matrix (``frames``: name -> labelled DataFrame).
    ``mark``: optional ``{name: [(row, col), ...]}`` cells to outline (e.g. each row's maximum)."""
    import seaborn as sns
    from matplotlib.patches import Rectangle

    plt = _plt()
    names = list(frames)
    cols = min(3, len(names)) or 1
    rows = int(np.ceil(len(names) / cols)) or 1
    n = max(f.shape[0] for f in frames.values()) if frames else 1
    size = 2.2 + 0.28 * n
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1.0, size * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        f = frames[name]
        vmax = float(np.nanmax(np.abs(f.values))) or 1.0
        sns.heatmap(f, ax=ax, cmap="RdBu", center=0.0, vmin=-vmax, vmax=vmax,
                    cbar_kws={"label": value_label}, xticklabels=True, yticklabels=True)
        for (r, c) in (mark or {}).get(name, []):
            ax.add_patch(Rectangle((c, r), 1, 1, fill=False, edgecolor="black", lw=1.0))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(col_label)
        ax.set_ylabel(row_label)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def composition_heatmap(scores: np.ndarray, title: str, baseline: float | None = None):
    """Sender (rows) × receiver (columns) heatmap of a ``[L, H, L, H]`` score array, one cell
    per query head, layer boundaries marked; cells where the receiver is not later are blank."""
    import seaborn as sns

    plt = _plt()
    L, H = scores.shape[:2]
    mat = scores.reshape(L * H, L * H).astype(float).copy()
    la = np.repeat(np.arange(L), H)
    mat[la[:, None] >= la[None, :]] = np.nan
    side = min(14.0, 3.0 + 0.035 * L * H)
    fig, ax = plt.subplots(figsize=(side + 1.6, side))
    sns.heatmap(mat, ax=ax, cmap="magma", cbar_kws={"label": "composition score"
                                                     + (f" (random baseline {baseline:.3f})" if baseline else "")},
                xticklabels=False, yticklabels=False, rasterized=True)
    ticks = np.arange(L) * H + H / 2
    step = max(1, L // 15)
    ax.set_xticks(ticks[::step])
    ax.set_xticklabels([str(i) for i in range(0, L, step)], fontsize=7)
    ax.set_yticks(ticks[::step])
    ax.set_yticklabels([str(i) for i in range(0, L, step)], fontsize=7)
    for b in np.arange(1, L) * H:
        ax.axhline(b, color="white", lw=0.2)
        ax.axvline(b, color="white", lw=0.2)
    ax.set_xlabel(f"receiver layer (each layer: query heads 0-{H - 1})")
    ax.set_ylabel(f"sender layer (each layer: query heads 0-{H - 1})")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def positional_panels(frames: dict[str, pd.DataFrame], title: str):
    """Query position × key position score panels (learned positions; NaN above the diagonal)."""
    return matrix_panels(frames, title, "query position", "key position", "attention score")
