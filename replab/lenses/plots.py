"""Lens figures (matplotlib Agg, PNG): trajectory heatmap, target curve, logit diff, eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from replab._figures import pyplot, save


def _short(tok: str, n: int = 7) -> str:
    tok = tok.replace("\n", "\\n")
    return tok if len(tok) <= n else tok[: n - 1] + "…"


def trajectory_heatmap(table: pd.DataFrame, path: str | Path, prompt_id: int = 0,
                       color: str = "top1_prob", title: str | None = None) -> Path:
    """Layer x position heatmap of one prompt, annotated with each cell's top-1 token.

    ``color``: a numeric column of the table (``top1_prob``, ``entropy``, ``kl_to_final``,
    ``target_prob``).
    """
    t = table[table["prompt_id"] == prompt_id]
    grid = t.pivot_table(index="depth", columns="position", values=color, aggfunc="first")
    labels = t.pivot_table(index="depth", columns="position", values="top1", aggfunc="first")
    points = t.drop_duplicates("depth").set_index("depth")["point"]
    tokens = t.drop_duplicates("position").sort_values("position")["token"].tolist()
    n_rows, n_cols = grid.shape
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 0.95 * n_cols), max(3.2, 1.6 + 0.26 * n_rows)))
    cmap = "viridis_r" if color in ("entropy", "kl_to_final") else "Blues"
    limits = {"vmin": 0.0, "vmax": 1.0} if color.endswith("prob") else {}
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap=cmap, origin="lower", **limits)
    vals = grid.to_numpy()
    hi = limits.get("vmax", np.nanmax(vals) if np.isfinite(vals).any() else 1.0)
    for i in range(n_rows):
        for j in range(n_cols):
            v = vals[i, j]
            dark = (v > 0.6 * hi) if cmap == "Blues" else (v < 0.4 * hi)
            ax.text(j, i, _short(str(labels.iloc[i, j])), ha="center", va="center", fontsize=6.5,
                    color="white" if dark else "black")
    ax.set_xticks(range(n_cols), [_short(tok, 10) for tok in tokens], rotation=45, ha="right",
                  fontsize=8)
    ax.set_yticks(range(n_rows), [str(points[d]) for d in grid.index], fontsize=6.5)
    ax.set_xlabel("input position (token)")
    ax.set_ylabel("layer (l_pre = residual entering block l)")
    lens = t["lens"].iloc[0]
    ax.set_title(title or f"{lens} lens: top-1 prediction per layer and position")
    fig.colorbar(im, ax=ax, label=color.replace("_", " "), fraction=0.04, pad=0.02)
    return save(fig, path, formats=("png", "svg"), tight_layout=True)[0]


def target_curve(table: pd.DataFrame, path: str | Path, summary: pd.DataFrame | None = None,
                 title: str | None = None) -> Path:
    """Target probability and rank by layer at each prompt's last position."""
    last = table[table["position"] == table.groupby("prompt_id")["position"].transform("max")]
    g = last.groupby("depth")
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    many = last["prompt_id"].nunique() > 1
    for _, p in last.groupby("prompt_id"):
        p = p.sort_values("depth")
        ax1.plot(p["depth"], p["target_prob"], color="tab:blue", alpha=0.15 if many else 0.9, lw=1)
        ax2.plot(p["depth"], p["target_rank"] + 1, color="tab:red", alpha=0.15 if many else 0.9, lw=1)
    if many:
        ax1.plot(g["target_prob"].mean().index, g["target_prob"].mean(), color="tab:blue", lw=2.5,
                 label="mean over prompts")
        ax2.plot(g["target_rank"].median().index, g["target_rank"].median() + 1, color="tab:red",
                 lw=2.5, label="median over prompts")
    ax2.set_yscale("log")
    ax2.invert_yaxis()  # up = better, as for the probability
    if summary is not None and summary["first_top1_layer"].notna().any():
        med = summary["first_top1_layer"].median()
        for ax in (ax1, ax2):
            ax.axvline(med, color="k", ls="--", lw=1, label=f"median first top-1: {med:g}")
    ax1.set_xlabel("layer (residual entering block)")
    ax1.set_ylabel("target probability")
    ax2.set_xlabel("layer (residual entering block)")
    ax2.set_ylabel("target rank (1 = top-1; log scale, inverted)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    lens = table["lens"].iloc[0]
    fig.suptitle(title or f"{lens} lens: target {table['target'].dropna().iloc[0]!r}"
                 if last["prompt_id"].nunique() == 1 else
                 title or f"{lens} lens: answer probability and rank by layer (last position)")
    return save(fig, path, formats=("png", "svg"), tight_layout=True)[0]


def logit_diff_plot(summary: pd.DataFrame, path: str | Path, title: str | None = None,
                    lens: str = "logit") -> Path:
    """Mean (± std) logit difference answer − foil by layer (logit lens: along the accumulated
    residual stream, with mid points; tuned lens: at its translator points)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for which, color in (("clean", "tab:green"), ("corrupt", "tab:orange")):
        s = summary[summary["which"] == which].sort_values("depth")
        if s.empty:
            continue
        ax.plot(s["depth"], s["mean"], marker="o", ms=2.5, color=color, label=f"{which} prompts")
        ax.fill_between(s["depth"], s["mean"] - s["std"].fillna(0), s["mean"] + s["std"].fillna(0),
                        color=color, alpha=0.15)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("layer (accumulated residual; x.5 = after attention, last = final)"
                  if lens == "logit" else "layer (residual entering block, translated; last = final)")
    ax.set_ylabel("logit difference (answer − foil)")
    ax.set_title(title or f"{lens} lens: logit difference (answer − foil) by layer")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path, formats=("png", "svg"), tight_layout=True)[0]


def eval_plot(df: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """KL(final ‖ lens) and cross-entropy per layer, logit vs tuned lens."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for lens, color in (("logit", "tab:gray"), ("tuned", "tab:purple")):
        s = df[df["lens"] == lens].sort_values("layer")
        inner = s[s["layer"] < s["layer"].max()]  # KL is 0 at the output: off a log axis
        ax1.plot(inner["layer"], inner["kl"], marker="o", ms=3, color=color, label=f"{lens} lens")
        ax2.plot(s["layer"], s["ce"], marker="o", ms=3, color=color, label=f"{lens} lens")
    ax1.set_yscale("log")
    for ax in (ax1, ax2):
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax1.set_ylabel("KL(final ‖ lens), nats (log scale)")
    ax2.set_ylabel("cross-entropy on next token, nats")
    for ax in (ax1, ax2):
        ax.set_xlabel("layer (residual entering block; last = final)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "Lens quality on held-out text")
    return save(fig, path, formats=("png", "svg"), tight_layout=True)[0]
