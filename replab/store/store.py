"""Reading an activation store: :func:`open_store` and :class:`ActivationStore`.

A store is a local directory or an fsspec URL (``s3://bucket/store``, ``memory://x``): a
remote store is read lazily by byte ranges (:mod:`replab.store.remote`)."""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.io import dir_locked, location, sha256_file
from replab.store import format as fmt

_VERIFY: contextvars.ContextVar[bool] = contextvars.ContextVar("replab_store_verify", default=False)


class ActivationStore:
    """A finished activation store on disk.

    Attributes:
        path: the store directory (a :class:`~pathlib.Path`), or its URL (a ``str``) for a
            store on object storage.
        remote: True for a store at an fsspec URL (read by byte ranges, never downloaded whole).
        manifest: the parsed ``manifest.json`` (model identity, dataset, config, tensors).
        index: DataFrame with one row per stored vector, aligned with every tensor.
        harvest_run: on the store :func:`replab.harvest` returns, that call's engine, rows,
            seconds and rows per second (None when opened with :func:`open_store`).
    """

    def __init__(self, path: str | Path, verify: bool | None = None):
        loc = location(path)
        self.harvest_run: dict | None = None     # set by replab.harvest on the store it returns
        verify = _VERIFY.get() if verify is None else bool(verify)
        self.remote = isinstance(loc, str)
        self._finite: set[str] = set()
        if self.remote:
            self._open_remote(loc, verify)
            return
        self.files = None
        self.path = loc
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
        self.check(verify=verify)

    def _open_remote(self, url: str, verify: bool) -> None:
        from replab.store.remote import RemoteFiles

        self.path = url
        self.files = RemoteFiles(url)
        if not self.files.exists(fmt.MANIFEST):
            if self.files.exists(fmt.PROGRESS):
                raise ReplabError(f"{url}: harvest was interrupted (or is running) and the store is incomplete; "
                                  "rerun the same harvest command to finish it")
            if not self.files.exists():
                raise ReplabError(f"{url}: no such store")
            raise ReplabError(f"{url}: not an activation store (no {fmt.MANIFEST})")
        self.manifest = fmt.parse_json(self.files.read(fmt.MANIFEST), f"{url}/{fmt.MANIFEST}", "manifest")
        self._index_file, self._tensors = fmt.manifest_files(url, self.manifest)
        self.check(verify=verify)

    def check(self, verify: bool = False) -> None:
        """Check every file's size and header; with ``verify`` also its sha256 and that
        every tensor holds only finite values. (A remote store: sizes and the ``.npy`` header
        bytes only, unless ``verify``.)"""
        if self.remote:
            self._check_remote(verify)
            return
        path = self._index_file["path"]
        if not path.is_file():
            raise ReplabError(f"{path}: index file is missing")
        if verify and sha256_file(path) != self._index_file["sha256"]:
            raise ReplabError(f"{path}: checksum mismatch (file is corrupted)")
        for t in self._tensors.values():
            fmt.check_tensor_file(t["path"], t["shape"], t["dtype"], t["sha256"] if verify else None)
        if verify:
            self.check_finite()

    def _check_remote(self, verify: bool) -> None:
        files = self.files
        index = self._index_file["path"]
        if not files.exists(index):
            raise ReplabError(f"{index}: index file is missing")
        if verify and files.sha256(index) != self._index_file["sha256"]:
            raise ReplabError(f"{index}: checksum mismatch (file is corrupted)")
        for t in self._tensors.values():
            shape, url = tuple(t["shape"]), t["path"]
            header = fmt.npy_header(shape, t["dtype"])
            if not files.exists(url):
                raise ReplabError(f"{url}: tensor file is missing")
            got, want = files.size(url), fmt.expected_size(shape, t["dtype"])
            if got != want:
                raise ReplabError(f"{url}: truncated or wrong size ({got} bytes, expected {want})")
            if files.read_range(url, 0, len(header)) != header:
                raise ReplabError(f"{url}: corrupted .npy header")
            if verify and files.sha256(url) != t["sha256"]:
                raise ReplabError(f"{url}: checksum mismatch (file is corrupted)")
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
            arr = self._array(hook)
            if self.remote:             # RangeArray checks every row it reads
                np.asarray(arr)
                self._finite.add(hook)
                continue
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
            if self.remote:
                import io

                index = pd.read_parquet(io.BytesIO(self.files.read(path)))
            else:
                index = pd.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - any parquet failure is a corrupted file
            first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise ReplabError(f"{path}: unreadable index ({first})") from None
        if len(index) != self.n_rows or "row" not in index.columns:
            raise ReplabError(f"{path}: index has {len(index)} rows (manifest: {self.n_rows}) "
                              "or no 'row' column; the store is damaged")
        return index

    def _array(self, hook: str):
        t = self._tensor(hook)
        if self.remote:
            from replab.store.remote import RangeArray

            header = len(fmt.npy_header(tuple(t["shape"]), t["dtype"]))
            return RangeArray(self.files, t["path"], header, t["shape"], t["dtype"], hook)
        return np.load(t["path"], mmap_mode="r", allow_pickle=False)

    def acts(self, hook: str):
        """``[rows, d]`` array for a full hook name, aligned with :attr:`index`.

        Local store: a memory map; its first read checks the whole hook for NaN and inf
        (:meth:`check_finite`). Remote store: a :class:`~replab.store.remote.RangeArray` that
        fetches only the rows it is indexed with (byte ranges of the ``.npy``) and checks those
        rows; ``np.asarray(...)`` of it reads everything.
        """
        if self.remote:
            return self._array(hook)
        self.check_finite([hook])
        return self._array(hook)

    def rows(self, hook: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of one hook as an in-memory ``[stop - start, d]`` array.

        Reads only those rows: a slice of the memory map (local) or one byte-range request
        (remote: bytes ``header + start * d * itemsize`` to ``header + stop * d * itemsize``
        of the ``.npy``). The rows are checked for NaN and inf.
        """
        arr = self._array(hook)
        if self.remote:
            return arr.rows(start, stop)
        out = np.array(arr[start:stop])
        bad = fmt.nonfinite_rows(out)
        if len(bad):
            raise ReplabError(f"{self._tensor(hook)['path']}: {hook} holds NaN or inf activations "
                              f"({fmt.describe_rows(bad + max(0, start))}); the store is unusable: harvest it again")
        return out

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
        size = sum(int(t.get("bytes") or 0) if self.remote else t["path"].stat().st_size
                   for t in self._tensors.values())
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
    """Open a finished activation store (a directory, or an fsspec URL such as
    ``s3://bucket/store``; see :mod:`replab.store.remote`).

    Every file the manifest names must lie inside ``path`` (no ``..``, absolute paths or
    symlinks out); sizes and ``.npy`` headers are checked, and each hook's values are
    checked for NaN/inf on first read (:meth:`ActivationStore.acts`).

    Args:
        path: the store directory (or URL) written by :func:`replab.harvest`.
        verify: also check every file's sha256 against the manifest and every value for
            NaN/inf (reads everything). None: the default, False unless inside
            :func:`verifying`.

    Raises:
        ReplabError: naming the file, if the store is incomplete, truncated or corrupted.
    """
    return ActivationStore(path, verify=verify)
