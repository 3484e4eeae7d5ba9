"""Cosine similarity between class-mean directions, per layer, with its chance baseline.

A class's mean direction at a layer is, by default (``center="grand"``),
``mean(x | class) - mean(x)``: the class mean relative to the grand mean of the selected
rows, so the shared offset of the residual stream does not make every pair look alike.

Centring on the grand mean biases the cosines **negative**: the row-weighted centred
means sum to zero, so two classes are always exactly -1 apart, and with ``K`` balanced
classes whose means are unrelated (independent random vectors) the expected pairwise
cosine is ``-1 / (K - 1)``. :func:`cosine_baseline` gives that null expectation for the
actual class weights; the table reports it per pair, and ``excess = cosine - baseline``
is what says whether two classes point the same way *more than unrelated classes would*.
``center="none"`` uses the raw class means (no baseline: dominated by the shared offset).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.store.select import as_store, pick_layers, where_mask

CENTERS = ("grand", "none")


def class_mean_directions(x: np.ndarray, labels, center: str = "grand"
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x [n, d]``, ``labels [n]`` -> ``(classes [K], unit directions [K, d], counts [K])``."""
    if center not in CENTERS:
        raise ReplabError(f"unknown --center {center!r}; use grand or none")
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    classes, counts = np.unique(labels, return_counts=True)
    offset = x.mean(0) if center == "grand" else 0.0
    dirs = np.stack([x[labels == c].mean(0) - offset for c in classes])
    norms = np.linalg.norm(dirs, axis=1, keepdims=True)
    return classes, dirs / np.maximum(norms, 1e-12), counts


def cosine_baseline(counts) -> np.ndarray:
    """``[K, K]`` expected cosine of grand-mean-centred class means under the null that the
    class means are independent isotropic random vectors (high dimension).

    With class weights ``w = counts / n`` and ``s = sum w^2``: ``E[c_a . c_b] ∝ s - w_a - w_b``
    and ``E||c_a||^2 ∝ 1 - 2 w_a + s``; for ``K`` balanced classes every off-diagonal entry
    is ``-1 / (K - 1)`` (two classes: ``-1``). Diagonal: 1.
    """
    w = np.asarray(counts, dtype=np.float64)
    w = w / w.sum()
    s = (w ** 2).sum()
    norm = np.sqrt(np.maximum(1 - 2 * w + s, 1e-12))
    base = (s - w[:, None] - w[None, :]) / np.outer(norm, norm)
    np.fill_diagonal(base, 1.0)
    return base


def cosine_matrix(x: np.ndarray, labels, center: str = "grand") -> pd.DataFrame:
    """Square DataFrame ``[K, K]`` of cosines between class-mean directions."""
    classes, dirs, _ = class_mean_directions(x, labels, center)
    return pd.DataFrame(dirs @ dirs.T, index=classes, columns=classes)


def cosine_layers(store, color: str, site: str = "resid_post", layers="all",
                  where: str | None = None, center: str = "grand") -> pd.DataFrame:
    """Tidy table ``layer, class_a, class_b, cosine, baseline, excess`` for every layer.

    ``baseline`` is :func:`cosine_baseline` (NaN with ``center="none"``) and
    ``excess = cosine - baseline``.
    """

    store = as_store(store)
    index = store.index
    if color not in index.columns:
        raise ReplabError(f"column {color!r} is not in the store")
    keep = index[color].notna().to_numpy() & where_mask(index, where)
    rows = np.flatnonzero(keep)
    labels = index[color].astype(str).to_numpy()[rows]
    if len(np.unique(labels)) < 2:
        raise ReplabError(f"column {color!r} needs at least two classes")
    classes, counts = np.unique(labels, return_counts=True)
    base = (pd.DataFrame(cosine_baseline(counts), index=classes, columns=classes)
            if center == "grand" else None)
    frames = []
    for layer, hook in pick_layers(store, site, layers).items():
        m = cosine_matrix(np.asarray(store.acts(hook)[rows]), labels, center)
        long = m.stack().rename("cosine").reset_index()
        long.columns = ["class_a", "class_b", "cosine"]
        long.insert(0, "layer", layer)
        long["baseline"] = (base.stack().to_numpy() if base is not None else np.nan)
        long["excess"] = long["cosine"] - long["baseline"]
        frames.append(long)
    return pd.concat(frames, ignore_index=True)
