"""Figures (matplotlib Agg + seaborn): projections per layer, probe accuracy vs layer,
class-mean cosine matrices. Each writes ``<base>.png`` and ``<base>.svg`` and returns
the PNG path. Colours are fixed per class: the *full* sorted class set of the colour
column (not the rows a ``--where`` keeps) maps to the palette in order, so a class has the
same colour in every panel and in every figure made from the same store.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from replab._figures import save, themed_pyplot


def class_palette(classes) -> dict:
    """``{class: colour}``: fixed order (sorted), tab10 up to 10 classes, else husl."""
    import seaborn as sns

    classes = sorted(map(str, classes))
    colours = sns.color_palette("tab10" if len(classes) <= 10 else "husl", len(classes))
    return dict(zip(classes, colours, strict=True))


def projection_palette(values, classes=None) -> dict:
    """``{class: colour}`` for the classes present in ``values``, with colours taken from
    :func:`class_palette` of ``classes`` (the column's full class set) when given."""
    present = set(pd.Series(values).astype(str).unique())
    full = class_palette(classes if classes is not None else present)
    return {k: v for k, v in full.items() if k in present}


def plot_projection(coords: pd.DataFrame, color: str, base, title: str = "",
                    method: str = "pca", ncols: int | None = None, classes=None) -> Path:
    """One panel per layer of a :func:`~replab.geometry.project.project_layers` table.

    ``classes``: the full class set of the colour column (fixes the colours; default:
    the classes present in ``coords``). The legend lists the classes present.
    """
    plt, sns = themed_pyplot()
    layers = sorted(coords["layer"].unique())
    ncols = ncols or min(6, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    palette = projection_palette(coords[color], classes)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.4 * nrows + 1.0),
                             squeeze=False, layout="constrained")
    label = {"pca": ("PC1", "PC2"), "umap": ("UMAP-1", "UMAP-2")}.get(method, ("x", "y"))
    for ax, layer in zip(axes.flat, layers, strict=False):
        # shuffled draw order (fixed seed): a class plotted last would hide coincident ones
        d = coords[coords["layer"] == layer].sample(frac=1.0, random_state=0)
        sns.scatterplot(data=d, x="x", y="y", hue=color, palette=palette, s=9, linewidth=0,
                        alpha=0.8, ax=ax, legend=False, hue_order=list(palette))
        sub = f"layer {layer}"
        if "explained_1" in d:
            sub += f"  ({d['explained_1'].iloc[0]:.0%}, {d['explained_2'].iloc[0]:.0%})"
        ax.set_title(sub, fontsize=9)
        ax.set_xlabel(label[0], fontsize=7)
        ax.set_ylabel(label[1], fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in palette.items()]
    # constrained layout: title above, legend below the panel grid, no overlaps or gaps
    fig.legend(handles=handles, title=color, loc="outside lower center",
               ncol=min(len(handles), 8), frameon=False, fontsize=9, title_fontsize=9)
    fig.suptitle(title or f"{method.upper()} by layer, coloured by {color}", fontsize=12)
    return save(fig, Path(base), formats=("png", "svg"))[0]   # dots in base (a --color name) are kept


def plot_cosines(cos: pd.DataFrame, base, title: str = "", ncols: int | None = None) -> Path:
    """Heatmap of class-mean cosines, one panel per layer (from ``cosine_layers``).

    With a ``baseline`` column (grand-mean centring) the colour scale is centred on the
    mean off-diagonal chance baseline (about ``-1/(K-1)``): white means "as similar as
    unrelated classes", red more similar, blue less.
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    plt, sns = themed_pyplot()
    layers = sorted(cos["layer"].unique())
    ncols = ncols or min(6, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    classes = sorted(cos["class_a"].unique())
    off = cos[cos["class_a"] != cos["class_b"]]
    centre = float(off["baseline"].mean()) if "baseline" in cos and off["baseline"].notna().any() else 0.0
    centre = min(max(centre, -0.99), 0.99)
    norm = TwoSlopeNorm(vmin=-1.0, vcenter=centre, vmax=1.0)
    side = 1.0 + 0.28 * len(classes)
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows + 0.5), squeeze=False)
    for i, (ax, layer) in enumerate(zip(axes.flat, layers, strict=False)):
        m = cos[cos["layer"] == layer].pivot(index="class_a", columns="class_b", values="cosine")
        m = m.loc[classes, classes]
        last_row = i + ncols >= len(layers)
        sns.heatmap(m, norm=norm, cmap="RdBu_r", square=True, cbar=False, ax=ax,
                    xticklabels=last_row, yticklabels=i % ncols == 0)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("")
        ax.set_ylabel("")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    sm = plt.cm.ScalarMappable(cmap="RdBu_r", norm=norm)
    label = "cosine of class-mean directions"
    if centre != 0.0:
        label += f"\n(white = chance baseline {centre:.2f} ≈ -1/(K-1), K = {len(classes)})"
    fig.colorbar(sm, ax=axes, shrink=0.6, label=label, ticks=np.unique([-1, centre, 0, 1]))
    fig.suptitle(title or "cosine similarity between class-mean directions", fontsize=12,
                 y=0.93 if nrows > 2 else 1.0)
    return save(fig, Path(base), formats=("png", "svg"))[0]


__all__ = ["class_palette", "projection_palette", "plot_projection", "plot_cosines"]
