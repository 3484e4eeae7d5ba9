"""Probe and Direction artifacts: safetensors (weights) + JSON (everything else). No pickles.

* A **probe artifact** ``probes/<kind>.safetensors`` holds, for every swept layer,
  ``L<layer>.coef [K, d]`` and ``L<layer>.intercept [K]`` (fitted on all selected
  rows); ``probes/<kind>.json`` holds the classes, hook site, layers, best layer, model
  identity, replab version and the sweep config. :func:`load_probe` /
  :func:`apply_probe` score new stores with it.
* A **Direction** is one unit vector in activation space with its provenance:
  hook, layer, position rule, label, class, kind, model identity, replab version, config.
  The features issue (direction patching) consumes these.

A probe run writes Directions for **every swept layer** (stable names, see
:func:`direction_path`)::

    directions/<kind>_L<layer>_<class>.safetensors + .json            kind: logistic, meandiff
    directions/shuffled_<kind>_L<layer>_<class>.safetensors + .json   same probe, shuffled labels
    directions/index.json                                            one entry per file

and :func:`load_directions` reads them back (``{class: Direction}`` for one kind/layer).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from replab._version import __version__
from replab.errors import ReplabError
from replab.io import inside
from replab.probes.estimators import LoadedProbe
from replab.probes.splits import select_rows
from replab.store.format import read_json
from replab.store.select import as_store, hook_for_layer


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
    label_source: str = "true"          # "shuffled": fitted on row-shuffled labels (a baseline)

    def __post_init__(self):
        v = np.asarray(self.vector, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0:
            raise ReplabError("a Direction needs a non-zero finite vector")
        self.vector = v / norm

    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (``direction [d]``) and ``path.json``; returns the JSON path."""
        from safetensors.numpy import save_file

        path = _strip(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"direction": self.vector}, str(path) + ".safetensors")
        meta = {k: v for k, v in asdict(self).items() if k != "vector"}
        meta.update(format="replab.direction", d=int(self.vector.shape[0]),
                    weights=Path(str(path) + ".safetensors").name)
        Path(str(path) + ".json").write_text(json.dumps(meta, indent=1, default=str) + "\n")
        return Path(str(path) + ".json")

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Read a Direction from its ``.json`` or ``.safetensors`` path (either one)."""
        from safetensors.numpy import load_file

        base = _strip(path)
        meta = _read_json(_own_file(base, ".json"))
        if meta.get("format") != "replab.direction":
            raise ReplabError(f"{base}.json: not a replab Direction")
        vec = _load_tensors(_own_file(base, ".safetensors"), load_file).get("direction")
        if vec is None:
            raise ReplabError(f"{base}.safetensors: no 'direction' tensor")
        keep = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta and k != "vector"}
        return cls(vector=vec, **keep)


def _own_file(base: Path, suffix: str) -> Path:
    """``base + suffix``, refused if it is a symlink that leaves ``base``'s folder."""

    return inside(base.parent, base.name + suffix, "artifact file")


def _load_tensors(path: Path, load_file) -> dict:
    """safetensors file -> ``{name: array}``; one-line ReplabError if missing or damaged."""
    if not path.is_file():
        raise ReplabError(f"{path}: weights file is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any safetensors failure is a damaged file
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise ReplabError(f"{path}: unreadable safetensors file ({first})") from None


def _strip(path) -> Path:
    """``path`` without a ``.json`` / ``.safetensors`` suffix (other dots are kept)."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def safe_name(c) -> str:
    """A class name as it appears in file names: alphanumerics, ``-`` and ``_`` kept,
    every other character replaced by ``_``."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(c))


def direction_path(folder, kind: str, layer: int, cls, shuffled: bool = False) -> Path:
    """``<folder>/[shuffled_]<kind>_L<layer>_<class>.json`` (class via :func:`safe_name`)."""
    prefix = "shuffled_" if shuffled else ""
    return Path(folder) / f"{prefix}{kind}_L{int(layer)}_{safe_name(cls)}.json"


def direction_vectors(coef: np.ndarray, classes) -> dict:
    """Per-class unit-able vectors from a probe's ``coef [K, d]``: row ``c`` minus the mean
    row (the class's one-vs-rest direction; with ``K = 2`` the two classes get opposite
    vectors, ``±(row_1 − row_0) / 2``). Returns ``{class: vector [d]}`` (not yet normalised)."""
    classes = [str(c) for c in classes]
    w = np.asarray(coef) - np.asarray(coef).mean(0)
    return {c: w[j] for j, c in enumerate(classes)}


def write_directions(folder, probes: dict, records, layers: dict, classes, label: str,
                     position: str, model: dict, config: dict, best_layer: int,
                     kinds=("logistic", "meandiff")) -> Path:
    """Save Direction artifacts for every layer of a sweep and ``index.json``.

    Args:
        folder: ``<run>/directions``.
        probes: ``{layer: {kind: (coef [K, d], intercept [K])}}`` (``shuffled_<kind>`` too).
        records: the sweep's records (their metrics go into each Direction).
        layers: ``{layer: hook}``.

    Returns:
        The path of ``index.json``: ``{"best_layer", "label", "classes", "kinds",
        "layers", "entries": [{"file", "kind", "layer", "class", "shuffled"}]}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    classes = [str(c) for c in classes]
    entries = []
    for layer, per_kind in sorted(probes.items()):
        for kind in kinds:
            for shuffled in (False, True):
                key = f"shuffled_{kind}" if shuffled else kind
                if key not in per_kind:
                    continue
                rec = records[(records["layer"] == layer) & (records["kind"] == kind)]
                metrics = {k: _plain(v) for k, v in rec.iloc[0].items() if k != "hook"} if len(rec) else {}
                if shuffled:
                    metrics = {"shuffled_accuracy": metrics.get("shuffled_accuracy"),
                               "n_rows": metrics.get("n_rows"), "lam": metrics.get("lam")}
                for cls, vec in direction_vectors(per_kind[key][0], classes).items():
                    if not np.isfinite(vec).all() or np.linalg.norm(vec) == 0:
                        continue
                    path = direction_path(folder, kind, layer, cls, shuffled)
                    Direction(vector=vec, hook=layers[layer], layer=int(layer), position=position,
                              label=label, positive_class=cls, classes=classes, kind=kind,
                              model=model, config=config, metrics=metrics,
                              label_source="shuffled" if shuffled else "true").save(path)
                    entries.append({"file": path.name, "kind": kind, "layer": int(layer),
                                    "class": cls, "shuffled": shuffled})
    index = {"format": "replab.directions", "best_layer": int(best_layer), "label": label,
             "classes": classes, "kinds": list(kinds), "layers": sorted(int(k) for k in probes),
             "entries": entries, "replab_version": __version__}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folder / "index.json"


def load_directions(run, kind: str = "logistic", layer: int | None = None,
                    shuffled: bool = False) -> dict:
    """Directions of one kind and layer from a probe run: ``{class: Direction}``.

    Args:
        run: the probe run directory (or its ``directions`` folder).
        kind: ``logistic`` or ``meandiff``.
        layer: default: the run's best layer.
        shuffled: the shuffled-label probe's directions instead.
    """
    folder = Path(run)
    if (folder / "directions").is_dir():
        folder = folder / "directions"
    index = _read_json(folder / "index.json")
    if not isinstance(index.get("layers"), list):
        raise ReplabError(f"{folder / 'index.json'}: malformed directions index (no layers list)")
    layer = index.get("best_layer") if layer is None else int(layer)
    if layer not in index["layers"]:
        raise ReplabError(f"{folder}: no directions for layer {layer}; it has {index['layers']}")

    entries = index.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ReplabError(f"{folder / 'index.json'}: malformed directions index (no entries list)")
    try:
        out = {e["class"]: Direction.load(inside(folder, e["file"], "direction file"))
               for e in entries
               if e["kind"] == kind and e["layer"] == layer and bool(e["shuffled"]) == bool(shuffled)}
    except KeyError as exc:
        raise ReplabError(f"{folder / 'index.json'}: malformed directions index (an entry has no "
                          f"{exc.args[0]!r})") from None
    if not out:
        raise ReplabError(f"{folder}: no {'shuffled ' if shuffled else ''}{kind} directions "
                          f"at layer {layer} (kinds: {index['kinds']})")
    return out


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not np.isfinite(v) else v


def _read_json(path: Path) -> dict:

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

    path = Path(path)
    if path.is_dir():
        path = path / "probes" / "logistic.json" if (path / "probes").is_dir() else path / "logistic.json"
    base = path.with_suffix("")
    meta = _read_json(_own_file(base, ".json"))
    if meta.get("format") != "replab.probe":
        raise ReplabError(f"{base}.json: not a replab probe")
    if not isinstance(meta.get("layers"), list) or not isinstance(meta.get("classes"), list):
        raise ReplabError(f"{base}.json: malformed probe metadata (no layers or classes list)")
    layer = meta.get("best_layer") if layer is None else int(layer)
    if layer not in meta["layers"]:
        raise ReplabError(f"this probe has no layer {layer}; it has {meta['layers']}")
    w = _load_tensors(_own_file(base, ".safetensors"), load_file)
    if f"L{layer}.coef" not in w or f"L{layer}.intercept" not in w:
        raise ReplabError(f"{base}.safetensors: no weights for layer {layer}")
    probe = LoadedProbe()
    probe.classes_ = np.asarray(meta["classes"], dtype=object)
    probe.coef_ = w[f"L{layer}.coef"]
    probe.intercept_ = w[f"L{layer}.intercept"]
    if probe.coef_.ndim != 2 or probe.coef_.shape[0] != len(probe.classes_):
        raise ReplabError(f"{base}.safetensors: layer {layer} weights have shape {probe.coef_.shape}, "
                          f"expected [{len(probe.classes_)}, d]")
    probe.n_features_in_ = int(probe.coef_.shape[1])
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
        With a label column the summary has ``accuracy`` on the rows the probe's training
        run kept (its default filter - control people, odd-one-out rows - and ``--where``)
        and ``accuracy_all_rows`` on every row whose label is one of the probe's classes
        (``scored_rows`` / ``scored_rows_all``). ``in_sample`` is true when ``store`` is the
        store the probe was trained on (its saved weights were fitted on those rows: use the
        run's cross-validated records for accuracy there).
    """
    import pandas as pd

    store = as_store(store)
    probe, meta = load_probe(probe_path, layer)
    hook = hook_for_layer(store, str(meta.get("site") or "resid_post"), meta["layer"])
    x = np.asarray(store.acts(hook), dtype=np.float32)
    if x.shape[1] != probe.coef_.shape[1]:
        raise ReplabError(f"probe width {probe.coef_.shape[1]} != store width {x.shape[1]} at {hook}")
    if store.model.get("weights_sha256") != (meta.get("model") or {}).get("weights_sha256"):
        import warnings

        warnings.warn("the store was made by a different model than the probe", stacklevel=2)
    proba = probe.predict_proba(x)
    pred = probe.classes_[proba.argmax(1)]
    df = pd.DataFrame({"row": store.index["row"].to_numpy(), "prediction": pred.astype(str)})
    for j, c in enumerate(probe.classes_):
        df[f"p_{c}"] = proba[:, j]
    summary = {"probe": str(probe_path), "kind": meta.get("kind"), "layer": meta["layer"],
               "hook": hook, "rows": int(len(df)), "label": meta.get("label"),
               # the saved probe was fitted on all of its training rows: scoring them is in-sample
               "in_sample": _same_path(meta.get("store"), store.path)}
    col = label or meta.get("label")
    if col in store.index.columns:
        truth = store.index[col].astype(str).to_numpy()
        known = np.isin(truth, probe.classes_.astype(str))
        summary["label"] = col
        summary["accuracy_all_rows"] = _acc(pred, truth, known)
        summary["scored_rows_all"] = int(known.sum())
        cfg = meta.get("config") or {}
        keep = known & _training_filter(store.index, col, cfg)
        summary["accuracy"] = _acc(pred, truth, keep)
        summary["scored_rows"] = int(keep.sum())
        summary["row_filter"] = ("training filter" + (f" + where {cfg['where']!r}" if cfg.get("where") else "")
                                 if cfg.get("default_filter", True) or cfg.get("where") else "none")
    return df, summary


def _same_path(a, b) -> bool:
    try:
        return a is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _acc(pred, truth, mask) -> float | None:
    return float((pred.astype(str)[mask] == truth[mask]).mean()) if mask.any() else None


def _training_filter(index, label: str, cfg: dict) -> np.ndarray:
    """Rows the probe's training run would have kept (its default filter and ``where``)."""

    keep = np.zeros(len(index), dtype=bool)
    try:
        rows, _ = select_rows(index, label, cfg.get("where"), cfg.get("default_filter", True))
    except ReplabError:
        return keep
    keep[rows] = True
    return keep
