"""SAE figures (matplotlib Agg + seaborn, PNG): latent frequency histogram, top latents bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from replab._figures import pyplot, save

DPI = 120


def frequency_plot(latents: pd.DataFrame, path: str | Path, title: str = "",
                   dense_threshold: float = 0.1) -> Path:
    """Histogram of log10 latent firing frequency; dead latents counted in the title."""
    import seaborn as sns

    plt = pyplot()
    freq = latents["frequency"].to_numpy()
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if len(alive):
        sns.histplot(x=np.log10(alive), bins=50, ax=ax, color="#4c72b0")
    ax.axvline(np.log10(dense_threshold), color="crimson", ls="--", lw=1,
               label=f"dense threshold ({dense_threshold:g})")
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    n_dead = int((freq <= 0).sum())
    ax.set_title(f"{title}\n{len(freq)} latents, {n_dead} dead (never fire), "
                 f"{int((freq > dense_threshold).sum())} dense", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path, formats=("png", "svg"), dpi=DPI, tight_layout=True)[0]      # PNG + SVG


def top_latents_plot(top: pd.DataFrame, path: str | Path, value: str = "contribution",
                     title: str = "", examples: pd.DataFrame | None = None) -> Path:
    """Seaborn bar chart of the top latents (``value`` per latent).

    Bars are blue when the latent is more active on the positive class (``diff > 0``; by
    cosine sign without a store), red otherwise. Labels: the tokens of the latent's
    top-activating store rows when ``examples`` is given, else its top logit-effect tokens.
    """
    import seaborn as sns

    plt = pyplot()
    if value not in top.columns or top[value].isna().all():
        value = "cosine"
    t = top.copy()
    sign = t["diff"] if "diff" in t.columns and t["diff"].notna().all() else t["cosine"]
    words = {}
    if examples is not None and len(examples):
        for lat, g in examples.groupby("latent"):
            words[int(lat)] = ", ".join(dict.fromkeys(str(x).strip() for x in g["token"]))
    t["label"] = [f"#{int(lat)}  " + (words.get(int(lat)) or str(tok or ""))[:40]
                  for lat, tok in zip(t["latent"], t.get("top_tokens", [None] * len(t)), strict=True)]
    fig, ax = plt.subplots(figsize=(8.0, 0.45 * len(t) + 1.4))
    colors = ["#4c72b0" if v >= 0 else "#c44e52" for v in sign]
    sns.barplot(data=t, y="label", x=value, hue="label", palette=colors, legend=False, ax=ax,
                orient="h")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_ylabel("latent  (" + ("top-activating tokens" if words else "top logit-effect tokens") + ")")
    ax.set_xlabel(value.replace("_", " ") + "   (blue: more active on the class, red: less)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9)
    return save(fig, path, formats=("png", "svg"), dpi=DPI, tight_layout=True)[0]      # PNG + SVG
