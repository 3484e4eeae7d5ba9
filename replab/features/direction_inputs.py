"""Where a direction comes from: artifacts, raw vectors, probes and activation stores.

:func:`load_direction` turns any of these into a :class:`DirectionInput` (an orthonormal
``[k, d]`` basis plus the provenance that fixes the default site, layer and positions):

* a replab **Direction** artifact (``directions/<kind>_L<layer>_<class>.json`` or its
  ``.safetensors``): hook, layer and position rule come with it;
* a **probe run directory** (``kind``: logistic or meandiff): the run's own Direction
  artifact for ``cls`` at ``layer`` (default: the probe's best layer), found through
  :mod:`replab.probes.directions`; runs without an artifact at that layer give the same
  vector from the saved weights;
* a **probe** artifact (``probes/<kind>.json``): the direction of ``cls`` at ``layer`` = that
  class's ``coef_`` row minus the mean row (the rule the probe run uses to write Direction
  artifacts); ``cls="artist-scientist"`` gives the difference of the two classes' rows;
* an **activation store** directory: the difference of class means at ``layer``
  (``cls="artist"``: artist vs the rest; ``"artist-scientist"``: artist vs scientist), on the
  rows a probe would use (controls and odd-one-out rows dropped);
* a raw ``.npy`` / ``.safetensors`` vector ``[d]`` or subspace basis ``[k, d]``, or an array.

:func:`shuffled_direction` is the shuffled-label baseline (the probe run's shuffled-label
probe of the same kind, layer and class when it exists, else the class-mean difference after
permuting the labels, seeded) and :func:`fit_leace` fits LEACE on a store's rows.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from replab.errors import ReplabError
from replab.hooks import canonical_site
from replab.io import inside
from replab.probes.directions import Direction, direction_path, direction_vectors, load_probe
from replab.probes.erasure import fit_eraser
from replab.probes.splits import select_rows
from replab.store import open_store
from replab.store.select import as_store, hook_for_layer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass
class DirectionInput:
    """An orthonormal basis ``[k, d]`` (``k = 1`` for a direction) and where it came from.

    ``vector`` is the first basis row with its original sign (steering adds it).
    ``site``/``layer``/``position`` are None when the source does not say (raw vectors).
    """

    basis: np.ndarray
    site: str | None = None
    layer: int | None = None
    position: str | None = None
    label: str | None = None
    cls: str | None = None
    kind: str = "raw"
    source: str = ""
    store: str | None = None
    model: dict = field(default_factory=dict)
    run: str | None = None          # the probe run directory it came from (shuffled baseline)

    def __post_init__(self):
        b = np.asarray(self.basis, dtype=np.float64)
        b = b[None] if b.ndim == 1 else b
        if b.ndim != 2 or b.shape[0] == 0 or not np.isfinite(b).all():
            raise ReplabError(f"a direction must be a finite [d] vector or [k, d] basis, got shape {b.shape}")
        first = b[0] / max(np.linalg.norm(b[0]), 1e-30)
        q, r = np.linalg.qr(b.T)
        keep = np.abs(np.diag(r)) > 1e-8 * max(1.0, float(np.abs(np.diag(r)).max()))
        if not keep.any():
            raise ReplabError("the direction is zero")
        q = q[:, keep].T
        q[0] *= np.sign(q[0] @ first) or 1.0
        self.basis = q
        self.vector = first

    @property
    def k(self) -> int:
        return int(self.basis.shape[0])

    @property
    def d(self) -> int:
        return int(self.basis.shape[1])

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source, "k": self.k, "d": self.d, "site": self.site,
                "layer": self.layer, "position": self.position, "label": self.label, "class": self.cls,
                "store": self.store, "run": self.run}


def _site_of(hook: str) -> tuple[str, int | None]:

    return canonical_site(hook)


def _class_pair(cls: str | None, classes: list[str], what: str) -> tuple[str, str | None]:
    if not cls:
        raise ReplabError(f"{what} has several classes ({', '.join(classes)}): choose one with --class "
                          "(e.g. artist, or artist-scientist for a difference)")
    a, _, b = str(cls).partition("-")
    for c in (a, b) if b else (a,):
        if c not in classes:
            raise ReplabError(f"unknown class {c!r} in {what} (classes: {', '.join(classes)})")
    return a, (b or None)


def _class_vector(coef: np.ndarray, classes: list[str], a: str, b: str | None) -> np.ndarray:
    """The probe run's own per-class direction rule (``replab.probes.directions``): class row
    minus the mean row; ``A-B``: the difference of two such rows."""

    vecs = direction_vectors(np.asarray(coef, dtype=np.float64), classes)
    if a not in vecs or (b and b not in vecs):
        raise ReplabError(f"the probe has no direction for class {a if a not in vecs else b!r} "
                          f"(directions: {', '.join(vecs)})")
    return vecs[a] - (vecs[b] if b else 0.0)


def _from_probe(path: Path, layer: int | None, cls: str | None) -> DirectionInput:

    probe, meta = load_probe(path, layer)
    classes = [str(c) for c in meta["classes"]]
    a, b = _class_pair(cls, classes, f"probe {path}")
    vec = _class_vector(probe.coef_, classes, a, b)
    site = meta.get("site", "resid_post")
    run = path.parent.parent if path.parent.name == "probes" else None
    return DirectionInput(vec, site, int(meta["layer"]), meta.get("position"), meta.get("label"), cls,
                          f"probe:{meta.get('kind')}", str(path), meta.get("store"), meta.get("model") or {},
                          str(run) if run is not None else None)


def _from_probe_run(run: Path, layer: int | None, cls: str | None, kind: str) -> DirectionInput:
    """The probe run's own Direction artifact for ``cls`` at ``layer`` (default: the probe's best
    layer), found through :func:`replab.probes.directions.load_directions`; the same vector
    from the saved probe weights when the run has no artifact for that layer (older runs
    saved the best layer only) or for an ``A-B`` difference."""
    probe_json = inside(run, f"probes/{kind}.json", "probe file")
    if not probe_json.is_file():
        have = sorted(p.stem for p in (run / "probes").glob("*.json"))
        raise ReplabError(f"probe run {run} has no {kind} probe (it has: {', '.join(have) or 'none'})")
    if layer is None:

        layer = int(load_probe(probe_json)[1]["layer"])
    a, _, b = str(cls or "").partition("-")
    if cls and not b:
        art = _probe_artifact(run, kind, int(layer), a, shuffled=False)
        if art is not None:
            return _from_artifact(art, layer)
    return _from_probe(probe_json, layer, cls)


def _probe_artifact(run: Path, kind: str, layer: int, cls: str, shuffled: bool) -> Path | None:
    """Path of a probe run's (shuffled) Direction artifact, or None."""

    name = direction_path("directions", kind, layer, cls, shuffled)
    path = inside(run, name, "Direction artifact")     # a link out of the run is refused, not followed
    return path if path.is_file() else None


def _from_artifact(meta_path: Path, layer: int | None) -> DirectionInput:

    d = Direction.load(meta_path)
    if layer is not None and int(layer) != int(d.layer):
        raise ReplabError(f"{meta_path.name} is a layer-{d.layer} direction; it cannot be used at layer "
                          f"{layer} (use the probe run directory or probes/<kind>.json with --layer)")
    site, _ = _site_of(d.hook)
    run = meta_path.parent.parent
    return DirectionInput(d.vector, site, int(d.layer), d.position, d.label, d.positive_class,
                          f"direction:{d.kind}", str(meta_path), _store_of(meta_path), d.model,
                          str(run) if (run / "probes").is_dir() else None)


def _store_rows(store, label: str):

    rows, _ = select_rows(store.index, label)
    return rows, store.index[label].astype(str).to_numpy()[rows]


def class_mean_direction(store, layer: int, cls: str, label: str = "superclass",
                         site: str = "resid_post", shuffle_seed: int | None = None) -> np.ndarray:
    """Difference of class means ``[d]`` at ``layer`` of a store (``cls``: ``A`` vs the rest, or
    ``A-B``); with ``shuffle_seed`` the labels are permuted first (shuffled-label baseline)."""

    store = as_store(store)
    rows, y = _store_rows(store, label)
    a, b = _class_pair(cls, sorted(set(y)), f"store {store.path} ({label})")
    if shuffle_seed is not None:
        y = np.random.default_rng(shuffle_seed).permutation(y)
    x = np.asarray(store.acts(hook_for_layer(store, site, layer)), dtype=np.float64)[rows]
    pos = y == a
    neg = (y == b) if b else ~pos
    if not pos.any() or not neg.any():
        raise ReplabError(f"class {cls!r} has no rows on one side in {store.path}")
    return x[pos].mean(0) - x[neg].mean(0)


def _from_store(path: Path, layer: int | None, cls: str | None, label: str) -> DirectionInput:

    store = open_store(path)
    if layer is None:
        raise ReplabError("a direction from an activation store needs --layer")
    vec = class_mean_direction(store, layer, cls, label)
    pos = (store.manifest.get("config") or {}).get("positions")
    return DirectionInput(vec, "resid_post", int(layer), pos if isinstance(pos, str) else None, label, cls,
                          "store:class_mean_diff", str(path), str(path), store.model)


def _read_raw(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ReplabError(f"{path}: not a readable .npy array ({e})") from None
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any safetensors failure is a bad file
        raise ReplabError(f"{path}: not a readable safetensors file ({e})") from None
    if "direction" in tensors:
        return tensors["direction"]
    if len(tensors) != 1:
        raise ReplabError(f"{path} holds {len(tensors)} tensors ({', '.join(tensors)}); expected one "
                          "(or one named 'direction')")
    return next(iter(tensors.values()))


def load_direction(src, layer: int | None = None, cls: str | None = None,
                   label: str = "superclass", kind: str = "logistic") -> DirectionInput:
    """A :class:`DirectionInput` from a path or array (see the module docstring).

    ``layer`` picks a probe's or a store's layer (a Direction artifact has its own; a
    different ``layer`` there is refused, since the vector lives in that layer's space).
    ``kind`` picks the probe of a probe run directory (``logistic`` or ``meandiff``).
    """
    if not isinstance(src, (str, Path)):
        return DirectionInput(np.asarray(src, dtype=np.float64), source="array")
    path = Path(src)
    if not path.exists():
        raise ReplabError(f"direction {src} does not exist")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _from_store(path, layer, cls, label)
        if (path / "probes").is_dir():
            return _from_probe_run(path, layer, cls, kind)
        raise ReplabError(f"{path} is neither an activation store nor a probe run directory")
    meta_path = path.with_suffix(".json")
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt == "replab.probe":
        return _from_probe(meta_path, layer, cls)
    if fmt == "replab.direction":
        return _from_artifact(meta_path, layer)
    if path.suffix not in (".npy", ".safetensors"):
        raise ReplabError(f"{path}: expected a Direction/probe .json, a .npy or .safetensors vector, "
                          "a probe run directory or an activation store")
    return DirectionInput(_read_raw(path), kind="raw", source=str(path))


def _store_of(direction_json: Path) -> str | None:
    """The store a Direction artifact's probe run was trained on (from the run's summary)."""
    run = direction_json.parent.parent
    if not (run / "probes").is_dir():              # not inside a probe run directory
        return None
    names = ["summary.json", *(f"probes/{p.name}" for p in sorted((run / "probes").glob("*.json")))]
    for name in names:
        cand = inside(run, name, "run file")       # the run's own files only (a link out is refused)
        try:
            data = json.loads(cand.read_text())
        except (OSError, ValueError):
            continue
        store = data.get("store") if isinstance(data, dict) else None
        if store and isinstance(store, str):
            return store
    return None


def resolve_store(store: str | None) -> Path | None:
    """An existing store directory for ``store`` (as given, or None)."""
    if not store:
        return None
    p = Path(store)
    return p if (p / "manifest.json").is_file() else None


def probe_shuffled(direction: DirectionInput) -> tuple[np.ndarray, str] | None:
    """The shuffled-label probe's direction of the same run, kind, layer and class
    (``directions/shuffled_<kind>_L<layer>_<class>.json``), or None."""
    if not direction.run or direction.layer is None or not direction.cls or "-" in str(direction.cls):
        return None
    kind = direction.kind.split(":", 1)[-1]
    path = _probe_artifact(Path(direction.run), kind, int(direction.layer), str(direction.cls), shuffled=True)
    if path is None:
        return None

    return Direction.load(path).vector, f"the shuffled-label {kind} probe of the same run ({path.name})"


def shuffled_direction(src, direction: DirectionInput, seed: int = 0) -> tuple[np.ndarray, str]:
    """The shuffled-label baseline ``([d], how)``, first found of: ``src`` (a direction file,
    or a store whose class-mean difference is taken with permuted labels); the shuffled-label
    probe of the direction's own probe run (:func:`probe_shuffled`); the class-mean
    difference of the direction's own store with permuted labels."""
    if src is not None and not (Path(src).is_dir() and (Path(src) / "manifest.json").is_file()):
        d = load_direction(src, direction.layer)
        return d.vector, f"file {src}"
    if src is None:
        found = probe_shuffled(direction)
        if found is not None:
            return found
    store = resolve_store(src) if src is not None else resolve_store(direction.store)
    if store is None:
        raise ReplabError("give --shuffled (a direction file or a store); the direction has no known store")
    if direction.layer is None or not direction.cls:
        raise ReplabError("a shuffled-label baseline from a store needs the direction's layer and class")
    vec = class_mean_direction(store, direction.layer, direction.cls, direction.label or "superclass",
                               direction.site or "resid_post", shuffle_seed=seed)
    return vec, f"class-mean difference of {store} with shuffled {direction.label} labels (seed {seed})"


def fit_leace(store, layer: int, label: str = "superclass", site: str = "resid_post"):
    """A LEACE eraser fitted on a store's rows at ``layer`` (every class of ``label``)."""

    store = as_store(store)
    rows, y = _store_rows(store, label)
    classes = sorted(set(y))
    codes = np.array([classes.index(v) for v in y])
    x = np.asarray(store.acts(hook_for_layer(store, site, layer)), dtype=np.float32)[rows]
    return fit_eraser(x, codes, len(classes)), {"rows": int(len(rows)), "classes": classes, "label": label}


def check_model(direction: DirectionInput, model: HookedTransformer) -> str | None:
    """A warning text when the direction was made by a different model (weights hash), else None."""
    ident = getattr(model, "replab_identity", None)
    want = (direction.model or {}).get("weights_sha256")
    have = getattr(ident, "weights_sha256", None) if ident is not None else None
    if want and have and want != have:
        msg = f"the direction was made by a different model ({direction.model.get('name')})"
        warnings.warn(msg, stacklevel=2)
        return msg
    return None
