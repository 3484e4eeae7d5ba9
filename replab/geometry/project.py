"""2-D projections of a store's activations, layer by layer, as one tidy table.

:func:`project_layers` returns ``layer, row, x, y, <color column>`` (plus
``explained_1/2`` for PCA): one row per (layer, stored vector). Each layer is
projected on its own (PCA: centred, no scaling; UMAP: cosine metric, fixed seed).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab._progress import progress_bar
from replab.errors import ReplabError
from replab.store.select import as_store, pick_layers, where_mask

METHODS = ("pca", "umap")


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x [n, d]`` -> coordinates ``[n, 2]`` on the top two principal axes, and their
    explained-variance ratios ``[2]`` (signs fixed: the largest loading is positive)."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    vt = vt[:2].copy()
    for i in range(len(vt)):
        vt[i] *= np.sign(vt[i][np.abs(vt[i]).argmax()]) or 1.0
    coords = xc @ vt.T
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    var = s ** 2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    return coords.astype(np.float32), np.pad(ratio, (0, 2 - len(ratio)))


def umap_2d(x: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """``x [n, d]`` -> UMAP coordinates ``[n, 2]`` (cosine metric, deterministic seed)."""
    try:
        import umap
    except ImportError:  # pragma: no cover - declared in the probes extra
        raise ReplabError("UMAP needs umap-learn: pip install 'replab[probes]'") from None
    x = np.asarray(x, dtype=np.float32)
    if len(x) < 4:
        raise ReplabError("UMAP needs at least 4 rows")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1),
                        metric="cosine", random_state=seed, n_jobs=1, init="random")
    return reducer.fit_transform(x).astype(np.float32)


def project_layers(store, color: str, method: str = "pca", site: str = "resid_post",
                   layers="all", where: str | None = None, seed: int = 0,
                   progress: bool = False) -> pd.DataFrame:
    """Project every requested layer of ``store`` to 2-D.

    Args:
        store: an :class:`~replab.store.ActivationStore` or its directory.
        color: index column used to colour points (kept in the table).
        method: ``"pca"`` or ``"umap"``.
        site: hook alias (``resid_post``) or a full hook name.
        layers: layer spec (``"all"``, ``"0-9"``...).
        where: optional pandas query on the index to keep some rows.

    Returns:
        DataFrame ``layer, row, x, y, <color>`` (PCA adds ``explained_1``, ``explained_2``).
    """

    if method not in METHODS:
        raise ReplabError(f"unknown projection {method!r}; use pca or umap")
    store = as_store(store)
    index = store.index
    if color not in index.columns:
        raise ReplabError(f"colour column {color!r} is not in the store; "
                          f"it has: {', '.join(map(str, index.columns))}")
    keep = where_mask(index, where)
    rows = np.flatnonzero(keep)
    if len(rows) < 3:
        raise ReplabError("a projection needs at least 3 rows")
    chosen = pick_layers(store, site, layers)
    frames = []
    with progress_bar(len(chosen), method, unit="layer", enabled=progress) as bar:
        for layer, hook in chosen.items():
            x = np.asarray(store.acts(hook)[rows], dtype=np.float32)
            df = pd.DataFrame({"layer": layer, "row": index["row"].to_numpy()[rows]})
            if method == "pca":
                xy, ratio = pca_2d(x)
                df["explained_1"], df["explained_2"] = float(ratio[0]), float(ratio[1])
            else:
                xy = umap_2d(x, seed)
            df["x"], df["y"] = xy[:, 0], xy[:, 1]
            df[color] = index[color].astype(str).to_numpy()[rows]
            frames.append(df)
            bar.advance(1)
    return pd.concat(frames, ignore_index=True)
