"""Probe figures: accuracy (and selectivity) against layer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from replab._figures import save, themed_pyplot


def plot_probe_curves(records: pd.DataFrame, base, title: str = "",
                      metric: str = "balanced_accuracy") -> Path:
    """Probe accuracy vs layer for every kind (and rank), with 95% CIs, and - when the
    records have a control task - a second panel with the selectivity of every kind.

    Left: ``metric`` (solid, with the entity-bootstrap CI band for balanced accuracy),
    dotted held-out-template balanced accuracy (full-rank kinds), grey chance. Right:
    task accuracy (solid) and control-task accuracy (dashed) on the control folds, and
    their difference, the selectivity, as the shaded gap (full-rank kinds; ranks as
    selectivity lines would crowd it).
    """

    plt, sns = themed_pyplot()
    recs = records.copy()
    recs["probe"] = [k if k != "lowrank" else f"rank-{int(r)}" for k, r in
                     zip(recs["kind"], recs["rank"], strict=True)]
    palette = dict(zip(sorted(recs["probe"].unique()),
                       sns.color_palette("deep", recs["probe"].nunique()), strict=True))
    controls = "matched_accuracy" in recs and recs["control_accuracy"].notna().any()
    fig, axes = plt.subplots(1, 2 if controls else 1, figsize=(13 if controls else 8, 4.6),
                             squeeze=False)
    ax = axes[0, 0]
    for name, d in recs.groupby("probe"):
        d = d.sort_values("layer")
        c = palette[name]
        ax.plot(d["layer"], d[metric], "-o", ms=3, color=c, label=f"{name}")
        if metric == "balanced_accuracy" and d["ci_low"].notna().any():
            ax.fill_between(d["layer"], d["ci_low"], d["ci_high"], color=c, alpha=0.18, lw=0)
        if not name.startswith("rank-") and d["heldout_balanced_accuracy"].notna().any():
            ax.plot(d["layer"], d["heldout_balanced_accuracy"], ":", color=c,
                    label=f"{name}, held-out template")
    if metric == "balanced_accuracy":
        chance = 1.0 / recs["n_classes"].max()
        ax.axhline(chance, color="grey", lw=1, label=f"chance (1/K = {chance:.2f})")
    else:
        maj = recs.groupby("layer")["majority_accuracy"].first()
        ax.plot(maj.index, maj.values, color="grey", lw=1, label="majority baseline")
    ax.set_xlabel("layer")
    band = metric == "balanced_accuracy" and recs["ci_low"].notna().any()
    ax.set_ylabel(metric.replace("_", " ") + (" (band: 95% CI)" if band else ""))
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "probe accuracy by layer", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", frameon=False)
    if controls:
        ax2 = axes[0, 1]
        for name, d in recs.groupby("probe"):
            if name.startswith("rank-") or d["control_accuracy"].isna().all():
                continue
            d = d.sort_values("layer")
            c = palette[name]
            ax2.plot(d["layer"], d["matched_accuracy"], "-", color=c, label=f"{name}, task")
            ax2.plot(d["layer"], d["control_accuracy"], "--", color=c,
                     label=f"{name}, control task")
            ax2.fill_between(d["layer"], d["control_accuracy"], d["matched_accuracy"], color=c,
                             alpha=0.15, lw=0)
        ax2.set_xlabel("layer")
        ax2.set_ylabel("accuracy on the control folds")
        ax2.set_ylim(0, 1.02)
        ax2.set_title("selectivity = task − control (shaded), same folds", fontsize=10)
        ax2.legend(fontsize=7, loc="lower right", frameon=False)
    fig.tight_layout()
    return save(fig, Path(base), formats=("png", "svg"))[0]
