"""Cosine similarity between class-mean directions, per layer.

A class's mean direction at a layer is ``mean(x | class) - mean(x)`` (the class mean
relative to the grand mean of the selected rows, so the shared offset of the residual
stream does not make every pair look similar). The table answers "do digits and
number words point the same way after layer L?" in numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.probes.splits import where_mask


def class_mean_directions(x: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """``x [n, d]``, ``labels [n]`` -> ``(classes [K], unit directions [K, d])``."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    classes = np.unique(labels)
    grand = x.mean(0)
    dirs = np.stack([x[labels == c].mean(0) - grand for c in classes])
    norms = np.linalg.norm(dirs, axis=1, keepdims=True)
    return classes, dirs / np.maximum(norms, 1e-12)


def cosine_matrix(x: np.ndarray, labels) -> pd.DataFrame:
    """Square DataFrame ``[K, K]`` of cosines between class-mean directions."""
    classes, dirs = class_mean_directions(x, labels)
    return pd.DataFrame(dirs @ dirs.T, index=classes, columns=classes)


def cosine_layers(store, color: str, site: str = "resid_post", layers="all",
                  where: str | None = None) -> pd.DataFrame:
    """Tidy table ``layer, class_a, class_b, cosine`` for every requested layer."""
    from replab.probes.data import pick_layers
    from replab.store import open_store

    from replab.probes.data import as_store
    store = as_store(store)
    index = store.index
    if color not in index.columns:
        raise ReplabError(f"column {color!r} is not in the store")
    keep = index[color].notna().to_numpy() & where_mask(index, where)
    rows = np.flatnonzero(keep)
    labels = index[color].astype(str).to_numpy()[rows]
    if len(np.unique(labels)) < 2:
        raise ReplabError(f"column {color!r} needs at least two classes")
    frames = []
    for layer, hook in pick_layers(store, site, layers).items():
        m = cosine_matrix(np.asarray(store.acts(hook)[rows]), labels)
        long = m.stack().rename("cosine").reset_index()
        long.columns = ["class_a", "class_b", "cosine"]
        long.insert(0, "layer", layer)
        frames.append(long)
    return pd.concat(frames, ignore_index=True)
