"""Figures for direction patching: the dose–response curve and the random-baseline histogram.

Both take the tidy tables of :class:`~replab.features.direction_patch.DirectionPatchResult`
and return a matplotlib Figure; save with :func:`replab.patching.plots.save_figure`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from replab._figures import pyplot

if TYPE_CHECKING:
    from replab.features.verdict import DirectionSummary


def dose_response(steering: pd.DataFrame, title: str, metric: str, unit: str = "raw"):
    """Metric vs steering coefficient α (with 95% CI), and the random vectors' 5–95% band
    (in normalised-effect units on the right axis: 0 = corrupt, 1 = clean)."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.4, 3.8))
    a = steering["alpha"].to_numpy()
    ax.plot(a, steering["metric_after"], marker="o", color="C0", label="direction")
    ax.fill_between(a, steering["metric_low"], steering["metric_high"], color="C0", alpha=0.2)
    what = "α · direction" if unit == "raw" else "α · gap · direction (gap: clean − corrupt projection)"
    ax.set_xlabel(f"steering coefficient α (added {what})")
    ax.set_ylabel(f"{metric} (mean over prompts)")
    ax.set_title("dose–response")
    ax.legend(fontsize=7)
    ax2.plot(a, steering["normalized_effect"], marker="o", color="C0", label="direction")
    ax2.fill_between(a, steering["ci_low"], steering["ci_high"], color="C0", alpha=0.2)
    if steering["random_mean"].notna().any():
        ax2.plot(a, steering["random_mean"], color="grey", ls="--", label="random vectors (mean)")
        ax2.fill_between(a, steering["random_p05"], steering["random_p95"], color="grey", alpha=0.2,
                         label="random 5–95%")
    ax2.axhline(0, color="black", lw=0.6)
    ax2.axhline(1, color="black", lw=0.6, ls=":")
    ax2.set_xlabel("steering coefficient α")
    ax2.set_ylabel("normalised effect (0 = corrupt, 1 = clean)")
    ax2.set_title("vs random directions")
    ax2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def random_histogram(random: pd.DataFrame, summary: DirectionSummary, title: str):
    """Random directions' denoising effects, with the direction, its CI, the complement,
    the shuffled-label direction and the full-residual patch marked."""
    plt = pyplot()
    s = summary
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    vals = random["normalized_effect"].to_numpy()
    ax.hist(vals, bins=max(10, min(40, len(vals) // 3)), color="grey", alpha=0.7,
            label=f"{len(vals)} random directions")
    ax.axvline(s.effect, color="C0", lw=2, label=f"direction ({s.effect:.2f})")
    ax.axvspan(s.ci_low, s.ci_high, color="C0", alpha=0.15)
    ax.axvline(s.full_residual_effect, color="black", ls="--", label=f"full residual ({s.full_residual_effect:.2f})")
    ax.axvline(s.complement_effect, color="C2", ls=":", label=f"complement ({s.complement_effect:.2f})")
    if s.shuffled_effect is not None:
        ax.axvline(s.shuffled_effect, color="C3", ls="-.", label=f"shuffled ({s.shuffled_effect:.2f})")
    ax.axvline(float(np.quantile(vals, 0.95)), color="grey", ls=":", lw=1, label="random p95")
    ax.set_xlabel("normalised effect of the denoising patch (0 = corrupt, 1 = clean)")
    ax.set_ylabel("count")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
