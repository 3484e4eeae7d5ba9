"""Probe and Direction artifacts: safetensors (weights) + JSON (everything else). No pickles.

* A **probe artifact** ``probes/<kind>.safetensors`` holds, for every swept layer,
  ``L<layer>.coef [K, d]`` and ``L<layer>.intercept [K]`` (fitted on all selected
  rows); ``probes/<kind>.json`` holds the classes, hook site, layers, best layer, model
  identity, replab version and the sweep config. :func:`load_probe` /
  :func:`apply_probe` score new stores with it.
* A **Direction** is one unit vector in activation space with its provenance:
  hook, layer, position rule, label, class, kind, model identity, replab version, config.
  The features issue (direction patching) consumes these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from replab._version import __version__
from replab.errors import ReplabError


@dataclass
class Direction:
    """A unit vector ``[d]`` in one hook's activation space, with where it came from."""

    vector: np.ndarray
    hook: str
    layer: int
    position: str
    label: str
    positive_class: str
    classes: list
    kind: str
    model: dict
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    replab_version: str = __version__

    def __post_init__(self):
        v = np.asarray(self.vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0:
            raise ReplabError("a Direction needs a non-zero finite vector")
        self.vector = v / norm

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (``direction [d]``) and ``path.json``; returns the JSON path."""
        from safetensors.numpy import save_file

        path = Path(path).with_suffix("")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"direction": self.vector}, str(path) + ".safetensors")
        meta = {k: v for k, v in asdict(self).items() if k != "vector"}
        meta.update(format="replab.direction", d=int(self.vector.shape[0]),
                    weights=Path(str(path) + ".safetensors").name)
        Path(str(path) + ".json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        return Path(str(path) + ".json")

    @classmethod
    def load(cls, path: str | Path) -> "Direction":
        """Read a Direction from its ``.json`` or ``.safetensors`` path (either one)."""
        from safetensors.numpy import load_file

        base = Path(path).with_suffix("")
        meta = _read_json(Path(str(base) + ".json"))
        if meta.get("format") != "replab.direction":
            raise ReplabError(f"{base}.json: not a replab Direction")
        vec = load_file(str(base) + ".safetensors")["direction"]
        keep = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta and k != "vector"}
        return cls(vector=vec, **keep)


def _read_json(path: Path) -> dict:
    from replab.store.format import read_json

    return read_json(path, "artifact metadata")


def save_probe(out: Path, kind: str, layers: dict, meta: dict) -> Path:
    """Save ``{layer: (coef [K, d], intercept [K])}`` as ``out/<kind>.safetensors`` + JSON."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, (coef, icpt) in layers.items():
        tensors[f"L{layer}.coef"] = np.ascontiguousarray(coef, dtype=np.float32)
        tensors[f"L{layer}.intercept"] = np.ascontiguousarray(icpt, dtype=np.float32)
    save_file(tensors, str(out / f"{kind}.safetensors"))
    meta = {**meta, "format": "replab.probe", "kind": kind, "layers": sorted(map(int, layers)),
            "weights": f"{kind}.safetensors", "replab_version": __version__}
    (out / f"{kind}.json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
    return out / f"{kind}.json"


def load_probe(path: str | Path, layer: int | None = None):
    """Load a saved probe as a fitted estimator for one layer (default: its best layer).

    Returns ``(probe, meta)``: ``probe`` has ``classes_``, ``coef_``, ``intercept_``,
    ``predict``, ``predict_proba``; ``meta`` is the JSON.
    """
    from safetensors.numpy import load_file

    from replab.probes.estimators import _LinearProbe

    path = Path(path)
    if path.is_dir():
        path = path / "probes" / "logistic.json" if (path / "probes").is_dir() else path / "logistic.json"
    base = path.with_suffix("")
    meta = _read_json(Path(str(base) + ".json"))
    if meta.get("format") != "replab.probe":
        raise ReplabError(f"{base}.json: not a replab probe")
    layer = meta.get("best_layer") if layer is None else int(layer)
    if layer not in meta["layers"]:
        raise ReplabError(f"this probe has no layer {layer}; it has {meta['layers']}")
    w = load_file(str(base) + ".safetensors")
    probe = _LinearProbe()
    probe.classes_ = np.asarray(meta["classes"], dtype=object)
    probe.coef_ = w[f"L{layer}.coef"]
    probe.intercept_ = w[f"L{layer}.intercept"]
    meta = {**meta, "layer": layer}
    return probe, meta


def apply_probe(probe_path, store, layer: int | None = None, label: str | None = None):
    """Score every row of ``store`` with a saved probe.

    Args:
        probe_path: a ``probes/<kind>.json`` (or the run directory: its logistic probe).
        store: an :class:`~replab.store.ActivationStore` or its path.
        layer: the probe layer to use (default: the probe's best layer).
        label: optional label column; when present, accuracy is reported against it.

    Returns:
        ``(predictions DataFrame [rows: row, prediction, p_<class>...], summary dict)``.
    """
    import pandas as pd

    from replab.probes.data import hook_for_layer
    from replab.store import open_store

    from replab.probes.data import as_store
    store = as_store(store)
    probe, meta = load_probe(probe_path, layer)
    hook = hook_for_layer(store, meta["site"], meta["layer"])
    x = np.asarray(store.acts(hook), dtype=np.float32)
    if x.shape[1] != probe.coef_.shape[1]:
        raise ReplabError(f"probe width {probe.coef_.shape[1]} != store width {x.shape[1]} at {hook}")
    if store.model.get("weights_sha256") != meta["model"].get("weights_sha256"):
        import warnings

        warnings.warn("the store was made by a different model than the probe", stacklevel=2)
    proba = probe.predict_proba(x)
    pred = probe.classes_[proba.argmax(1)]
    df = pd.DataFrame({"row": store.index["row"].to_numpy(), "prediction": pred.astype(str)})
    for j, c in enumerate(probe.classes_):
        df[f"p_{c}"] = proba[:, j]
    summary = {"probe": str(probe_path), "kind": meta["kind"], "layer": meta["layer"],
               "hook": hook, "rows": int(len(df)), "label": meta["label"]}
    col = label or meta["label"]
    if col in store.index.columns:
        truth = store.index[col].astype(str).to_numpy()
        known = np.isin(truth, probe.classes_.astype(str))
        summary["label"] = col
        summary["scored_rows"] = int(known.sum())
        summary["accuracy"] = float((pred.astype(str)[known] == truth[known]).mean()) if known.any() else None
    return df, summary
