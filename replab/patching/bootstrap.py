"""Bootstrap CIs for normalised effects that resample *people*, not prompt pairs.

The super-class task reuses people: on SmolLM2 its 63 pairs name 21 artists and 12
scientists (each artist with up to 3 scientist partners), so the pairs are not independent
draws. Resampling pairs treats them as if they were and gives CIs that are too narrow.
:func:`resample_weights` does a **two-way cluster ("pigeonhole") bootstrap** instead:
each resample draws the clean people with replacement and, independently, the corrupt
people with replacement; pair ``i = (a, b)`` gets the weight ``count(a) · count(b)``.
Every statistic is then a ratio of weighted means over the pairs (Owen 2007, "The
pigeonhole bootstrap", for crossed random effects):

    effect_b = (Σ_i w_bi p_i − Σ_i w_bi x_i) / (Σ_i w_bi c_i − Σ_i w_bi x_i)

with ``p``/``c``/``x`` the per-pair patched / clean / corrupt metrics. Tasks without people
(``groups=None``) fall back to the ordinary bootstrap over pairs. The same weight matrix
is used for every variant of a run, so CIs of different rows are comparable. Every
patching CI goes through here: :func:`replab.patching.metrics.bootstrap_ci` (sweeps) and
the feature experiments (scan, direction and latent patching).
"""

from __future__ import annotations

import numpy as np


def _codes(ids) -> tuple[np.ndarray, int]:
    _, inv = np.unique(np.asarray(ids).astype(str), return_inverse=True)
    return inv.reshape(-1), int(inv.max()) + 1 if len(inv) else 0


def resample_weights(n: int, groups=None, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Bootstrap weights ``[n_boot, n]`` over ``n`` pairs (rows sum to 1; NaN if a row is empty).

    Args:
        groups: None (resample pairs), or ``(clean_ids [n], corrupt_ids [n])``: who the clean
            and the corrupt prompt of each pair name (two-way cluster bootstrap), or one id
            array ``[n]`` (one-way cluster bootstrap).
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        idx = rng.integers(0, n, size=(n_boot, n))
        w = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(np.float64)
    else:
        factors = groups if isinstance(groups, (tuple, list)) and len(groups) == 2 \
            and np.ndim(groups[0]) == 1 else (groups,)
        w = np.ones((n_boot, n))
        for ids in factors:
            code, k = _codes(ids)
            if len(code) != n:
                raise ValueError(f"group ids have {len(code)} entries for {n} pairs")
            draws = rng.integers(0, k, size=(n_boot, k))
            counts = np.stack([np.bincount(row, minlength=k) for row in draws]).astype(np.float64)
            w *= counts[:, code]
    tot = w.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, w / np.where(tot > 0, tot, 1), np.nan)


def ratio_ci(weights: np.ndarray, patched, clean, corrupt, level: float = 0.95):
    """CI ``(low [cells], high [cells])`` of ``(mean p − mean x) / (mean c − mean x)`` under
    bootstrap ``weights [B, n]`` (:func:`resample_weights`); ``patched [cells, n]``."""
    p = np.atleast_2d(np.asarray(patched, dtype=np.float64))
    c, x = weights @ np.asarray(clean, dtype=np.float64), weights @ np.asarray(corrupt, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = ((weights @ p.T) - x[:, None]) / (c - x)[:, None]
    eff[~np.isfinite(eff)] = np.nan
    a = (1 - level) / 2
    if np.isnan(eff).all():
        return np.full(p.shape[0], np.nan), np.full(p.shape[0], np.nan)
    low, high = np.nanquantile(eff, [a, 1 - a], axis=0)
    return low, high


def mean_ci(weights: np.ndarray, values, level: float = 0.95) -> tuple[float, float]:
    """CI of a weighted mean of ``values [n]`` under bootstrap ``weights [B, n]``."""
    m = weights @ np.asarray(values, dtype=np.float64)
    a = (1 - level) / 2
    lo, hi = np.nanquantile(m, [a, 1 - a])
    return float(lo), float(hi)


def task_groups(task):
    """``(clean_ids [n], corrupt_ids [n])``: the people each pair's prompts name (from
    ``task.meta["person_of"]``, ``{prompt: person}``, set by the super-class task), or None
    (resample pairs) when the task does not say."""
    who = (task.meta or {}).get("person_of")
    if not who or not task.prompts or not task.corrupt_prompts:
        return None
    try:
        return (np.array([who[p] for p in task.prompts]), np.array([who[p] for p in task.corrupt_prompts]))
    except KeyError:
        return None


def describe_groups(groups, n: int) -> str:
    if groups is None:
        return f"pairs ({n} prompt pairs resampled)"
    a, b = (len(set(map(str, g))) for g in groups)
    return f"people (two-way cluster bootstrap: {a} clean × {b} corrupt people, {n} pairs)"
