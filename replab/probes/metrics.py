"""Scores of out-of-fold predictions, with a grouped bootstrap 95% CI."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.stats import rankdata


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    classes = np.unique(y)
    return float(np.mean([(pred[y == c] == c).mean() for c in classes])) if len(y) else np.nan


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float((y == pred).mean()) if len(y) else np.nan


def macro_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """One-vs-rest macro AUROC; ``proba [n, K]`` columns are class codes ``0..K-1``."""
    present = np.unique(y)
    if len(present) < 2:
        return np.nan
    return float(np.mean([_auc(y == c, proba[:, c]) for c in present]))


def _auc(pos: np.ndarray, score: np.ndarray) -> float:
    """Binary AUROC as the Mann-Whitney statistic (ties count half), = ``roc_auc_score``."""
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


@lru_cache(maxsize=8)
def _draws(G: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, G]`` multinomial group weights (cached: every layer reuses them)."""
    out = np.random.default_rng(seed).multinomial(G, np.full(G, 1 / G), size=n_boot).astype(float)
    out.setflags(write=False)
    return out


def group_bootstrap_ci(y, pred, groups, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of balanced accuracy, resampling whole groups (entities) with replacement.

    Rows of one group are correlated (the same person in several templates), so the
    groups, not the rows, are the independent units.
    """
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups if groups.dtype.kind in "iub" else groups.astype(str),
                          return_inverse=True)
    G = len(uniq)
    if G < 2 or n_boot <= 0:
        return (np.nan, np.nan)
    classes = np.unique(y)
    # per-group counts of (class, correct) so each resample is a cheap weighted sum
    tot = np.zeros((G, len(classes)))
    hit = np.zeros((G, len(classes)))
    for j, c in enumerate(classes):
        m = y == c
        np.add.at(tot[:, j], inv[m], 1)
        np.add.at(hit[:, j], inv[m], (pred[m] == c))
    draws = _draws(G, n_boot, seed)                                 # [B, G] group weights
    T, H = draws @ tot, draws @ hit
    with np.errstate(invalid="ignore", divide="ignore"):
        bal = np.nanmean(np.where(T > 0, H / T, np.nan), axis=1)
    a = (1 - level) / 2
    return float(np.nanquantile(bal, a)), float(np.nanquantile(bal, 1 - a))
