"""Representation geometry: 2-D projections per layer (PCA, UMAP), cosine similarity
between class-mean directions, and the figures (:mod:`replab.geometry.plots`)."""

from pathlib import Path

from replab.geometry.cosine import class_mean_directions, cosine_baseline, cosine_layers, cosine_matrix
from replab.geometry.plots import plot_projection
from replab.geometry.project import pca_2d, project_layers, umap_2d
from replab.store.select import as_store

__all__ = ["class_mean_directions", "cosine_baseline", "cosine_layers", "cosine_matrix", "pca_2d",
           "project_layers", "umap_2d", "plot_geometry"]


def plot_geometry(store, color: str, method: str = "pca", out=None, site: str = "resid_post",
                  layers="all", where=None, seed: int = 0, progress: bool = False) -> dict:
    """Project every layer and draw one figure (panel per layer).

    Writes ``<out>/<method>_<color>.png/.svg`` and ``<out>/<method>_<color>.parquet``
    (``layer, row, x, y, <color>``). Returns ``{"figure", "svg", "table", "layers", "rows"}``.
    """
    store = as_store(store)
    coords = project_layers(store, color, method, site, layers, where, seed, progress)
    out = Path(out or Path(store.path) / "geometry")
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"{method}_{color}"
    coords.to_parquet(str(base) + ".parquet", index=False)
    name = Path(str(store.path)).name
    full = store.index[color].dropna().astype(str).unique()     # colours fixed per store
    png = plot_projection(coords, color, base, method=method, classes=full,
                          title=f"{method.upper()} of {site} by layer: {name}, coloured by {color}")
    return {"figure": str(png), "svg": str(base) + ".svg", "table": str(base) + ".parquet",
            "layers": sorted(int(v) for v in coords["layer"].unique()),
            "rows": int(coords["row"].nunique())}
