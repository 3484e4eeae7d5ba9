"""Reading an activation store: :func:`open_store` and :class:`ActivationStore`."""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.io import dir_locked, sha256_file
from replab.store import format as fmt

_VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("replab_store_verify", default=False)


class ActivationStore:
    """A finished activation store on disk.

    Attributes:
        path: the store directory.
        manifest: the parsed ``manifest.json`` (model identity, dataset, config, tensors).
        index: DataFrame with one row per stored vector, aligned with every tensor.
    """

    def __init__(self, path: str | Path, verify: bool | None = None):
        self.path = Path(path)
        verify = _VERIFY.get() if verify is None else bool(verify)
        if not self.path.exists():
            raise ReplabError(f"{self.path}: no such store directory")
        if not self.path.is_dir():
            raise ReplabError(f"{self.path}: is a file, not an activation store directory")
        if dir_locked(self.path):
            raise ReplabError(f"{self.path}: a harvest is running into this directory; "
                              "wait for it to finish")
        if not (self.path / fmt.MANIFEST).exists():
            if (self.path / fmt.PROGRESS).exists():
                raise ReplabError(
                    f"{self.path}: harvest was interrupted and the store is incomplete; "
                    "rerun the same harvest command to resume it"
                )
            raise ReplabError(f"{self.path}: not an activation store (no {fmt.MANIFEST})")
        self.manifest = fmt.read_json(self.path / fmt.MANIFEST, "manifest")
        self._index_file, self._tensors = fmt.manifest_files(self.path, self.manifest)
        self._finite: set[str] = set()
        self.check(verify=verify)

    def check(self, verify: bool = False) -> None:
        """Check every file's size and header; with ``verify`` also its sha256 and that
        every tensor holds only finite values."""
        path = self._index_file["path"]
        if not path.is_file():
            raise ReplabError(f"{path}: index file is missing")
        if verify and sha256_file(path) != self._index_file["sha256"]:
            raise ReplabError(f"{path}: checksum mismatch (file is corrupted)")
        for t in self._tensors.values():
            fmt.check_tensor_file(t["path"], t["shape"], t["dtype"], t["sha256"] if verify else None)
        if verify:
            self.check_finite()

    def check_finite(self, hooks=None) -> None:
        """ReplabError naming the hook, the file and the rows if a tensor holds NaN or inf.

        Every read through :meth:`acts` runs this once per hook, so no analysis (probes,
        LEACE, geometry, SAE decomposition) ever sees a non-finite activation.
        """
        for hook in self.hooks if hooks is None else hooks:
            if hook in self._finite:
                continue
            t = self._tensor(hook)
            arr = np.load(t["path"], mmap_mode="r", allow_pickle=False)
            bad = fmt.nonfinite_rows(arr)
            if len(bad):
                raise ReplabError(
                    f"{t['path']}: {len(bad)} of {arr.shape[0]} rows of {hook} hold NaN or inf "
                    f"activations ({fmt.describe_rows(bad)}); the store is unusable: harvest it again"
                )
            self._finite.add(hook)

    def _tensor(self, hook: str) -> dict:
        if hook not in self._tensors:
            raise ReplabError(
                f"hook {hook!r} is not in this store; it has: {', '.join(self.hooks)}"
            )
        return self._tensors[hook]

    @property
    def hooks(self) -> list[str]:
        """Full TransformerLens hook names stored, e.g. ``blocks.14.hook_resid_post``."""
        return list(self._tensors)

    @property
    def model(self) -> dict:
        """Identity of the model that produced the store."""
        return self.manifest["model"]

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    @cached_property
    def index(self) -> pd.DataFrame:
        """One row per stored vector: row, example_id, position, token_id, token, labels..."""
        path = self._index_file["path"]
        try:
            index = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - any parquet failure is a corrupted file
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ReplabError(f"{path}: unreadable index ({first})") from None
        if len(index) != self.n_rows or "row" not in index.columns:
            raise ReplabError(f"{path}: index has {len(index)} rows (manifest: {self.n_rows}) "
                              "or no 'row' column; the store is damaged")
        return index

    def acts(self, hook: str) -> np.ndarray:
        """Memory-mapped ``[rows, d]`` array for a full hook name, aligned with :attr:`index`.

        The first read of each hook checks it for NaN and inf (:meth:`check_finite`).
        """
        t = self._tensor(hook)
        self.check_finite([hook])
        return np.load(t["path"], mmap_mode="r", allow_pickle=False)

    def layer_acts(self, site: str = "resid_post") -> dict[int, np.ndarray]:
        """``{layer: acts}`` for every stored block hook of one site (e.g. ``resid_post``)."""
        from replab.hooks import parse_hook_name

        out = {}
        for hook in self.hooks:
            alias, layer = parse_hook_name(hook)
            if alias == site and layer is not None:
                out[layer] = self.acts(hook)
        if not out:
            raise ReplabError(f"no {site!r} hooks in this store; it has: {', '.join(self.hooks)}")
        return dict(sorted(out.items()))

    def summary(self) -> dict:
        """A JSON-friendly summary (used by ``replab store info``)."""
        m = self.manifest
        size = sum(t["path"].stat().st_size for t in self._tensors.values())
        labels = m["dataset"].get("label_columns") or []
        counts = {c: self.index[c].value_counts().to_dict() for c in labels if c in self.index
                  and self.index[c].nunique() <= 20}
        return {
            "path": str(self.path),
            "model": m["model"].get("name"),
            "model_sha256": m["model"].get("weights_sha256"),
            "dataset": m["dataset"].get("name"),
            "n_prompts": m["dataset"].get("n_prompts"),
            "n_rows": m["n_rows"],
            "positions": m["config"].get("positions"),
            "hooks": len(self._tensors),
            "layers": m["config"].get("layers"),
            "dtype": m["config"].get("dtype"),
            "bytes": size,
            "label_counts": {k: {str(a): int(b) for a, b in v.items()} for k, v in counts.items()},
            "replab_version": m.get("replab_version"),
        }

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, rows={self.n_rows}, hooks={len(self.hooks)})"


@contextmanager
def verifying(on: bool = True):
    """Within this block every :func:`open_store` without an explicit ``verify`` verifies
    (sha256 of every file, finite values): what the CLI's ``--verify`` option does."""
    token = _VERIFY.set(bool(on))
    try:
        yield
    finally:
        _VERIFY.reset(token)


def open_store(path: str | Path, verify: bool | None = None) -> ActivationStore:
    """Open a finished activation store.

    Every file the manifest names must lie inside ``path`` (no ``..``, absolute paths or
    symlinks out); sizes and ``.npy`` headers are checked, and each hook's values are
    checked for NaN/inf on first read (:meth:`ActivationStore.acts`).

    Args:
        path: the store directory written by :func:`replab.harvest`.
        verify: also check every file's sha256 against the manifest and every value for
            NaN/inf (reads everything). None: the default, False unless inside
            :func:`verifying`.

    Raises:
        ReplabError: naming the file, if the store is incomplete, truncated or corrupted.
    """
    return ActivationStore(path, verify=verify)
