"""Stores on object storage: fsspec URLs (``s3://``, ``gs://``, ``memory://`` ...).

Reading is lazy. :class:`RemoteFiles` reads whole objects only for the small ones (the
manifest, the index); a tensor is never downloaded to read part of it. A ``.npy`` file is a
fixed header then C-order rows, so row ``r`` of a ``[rows, d]`` tensor lies at byte
``header + r * d * itemsize``: :class:`RangeArray` turns ``store.acts(hook)[lo:hi]`` (or a
list of rows) into HTTP range requests (``fs.cat_ranges``) for exactly those bytes; opening
the store reads only the first ``header`` bytes of each tensor to check it.

Writing goes through a local staging directory (see :mod:`replab.store.writer`): objects are
uploaded whole (one PUT each: an object store shows all of an object or none of it, and has
no atomic rename), tensors and index first, ``manifest.json`` last.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np

from replab.errors import ReplabError
from replab.io import url_join


def filesystem(url: str):
    """``(fs, path)`` of an fsspec URL; a missing backend (``s3fs``, ``gcsfs``) is one line."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - fsspec comes with huggingface_hub
        raise ReplabError(f"{url}: reading URLs needs fsspec: pip install fsspec") from None
    try:
        return url_to_fs(url)
    except ImportError as exc:
        raise ReplabError(f"{url}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise ReplabError(f"{url}: {exc}") from None


class RemoteFiles:
    """The files of one store directory at a URL.

    Attributes:
        url: the directory's URL.
        bytes_read: bytes fetched so far.
        requests: every fetch, in order: ``("object", name)`` for a whole object,
            ``("range", name, start, end)`` for a byte range (``name`` relative to ``url``);
            tests check that reads stay lazy.
    """

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.bytes_read = 0
        self.requests: list[tuple] = []

    def _name(self, url_or_name: str) -> str:
        return url_or_name[len(self.url) + 1:] if url_or_name.startswith(self.url + "/") else url_or_name

    def _path(self, url_or_name: str) -> str:
        return self.root.rstrip("/") + "/" + self._name(url_or_name)

    def url_of(self, name: str) -> str:
        """The URL of a file given by its name in the store (or already by its URL)."""
        return name if name.startswith(self.url + "/") else url_join(self.url, name)

    def exists(self, name: str = "") -> bool:
        return bool(self.fs.exists(self._path(name) if name else self.root))

    def listdir(self) -> list[str]:
        """Names directly in the directory ([] when it does not exist)."""
        if not self.fs.exists(self.root):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]

    def size(self, name: str) -> int:
        return int(self.fs.size(self._path(name)))

    def read(self, name: str) -> bytes:
        """A whole object (the manifest, the index)."""
        data = self.fs.cat_file(self._path(name))
        self.bytes_read += len(data)
        self.requests.append(("object", self._name(name)))
        return data

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of an object: one range request."""
        data = self.fs.cat_file(self._path(name), start=start, end=end)
        self.bytes_read += len(data)
        self.requests.append(("range", self._name(name), int(start), int(end)))
        return data

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        if not ranges:
            return []
        path = self._path(name)
        out = self.fs.cat_ranges([path] * len(ranges), [a for a, _ in ranges], [b for _, b in ranges])
        for part in out:
            if isinstance(part, BaseException):
                raise ReplabError(f"{self.url_of(name)}: cannot read ({part})")
        self.bytes_read += sum(len(p) for p in out)
        self.requests += [("range", self._name(name), int(a), int(b)) for a, b in ranges]
        return out

    def sha256(self, name: str, chunk: int = 1 << 24) -> str:
        """sha256 of a whole object (streamed in ``chunk`` pieces)."""
        self.requests.append(("object", self._name(name)))
        h = hashlib.sha256()
        with self.fs.open(self._path(name), "rb") as f:
            while block := f.read(chunk):
                self.bytes_read += len(block)
                h.update(block)
        return h.hexdigest()

    def write(self, name: str, data: bytes) -> None:
        """One PUT of a whole object."""
        self.fs.pipe_file(self._path(name), data)

    def put(self, local, name: str) -> None:
        """Upload a local file as one object (multipart where the backend needs it; the
        object appears only when the upload completes)."""
        path = self._path(name)
        parent = path.rsplit("/", 1)[0]
        try:
            self.fs.makedirs(parent, exist_ok=True)
        except (OSError, NotImplementedError):   # flat object stores have no directories
            pass
        self.fs.put_file(str(local), path)

    def remove(self, name: str) -> None:
        if self.fs.exists(self._path(name)):
            self.fs.rm_file(self._path(name))


class RangeArray:
    """A read-only ``[rows, d]`` view of a remote ``.npy`` tensor, read by byte ranges.

    Indexing with an int, a slice (step 1), an int array or a boolean mask (optionally with a
    column index: ``a[rows, cols]``) fetches only the rows asked for, in as few ranges as the
    rows' runs allow, and returns a NumPy array. ``np.asarray(a)`` reads everything (in 64 MiB
    pieces). Every row read is checked for NaN/inf: a ReplabError names the hook and rows.
    """

    def __init__(self, files: RemoteFiles, name: str, header: int, shape, dtype, hook: str = ""):
        self.files, self.name, self.header = files, name, int(header)
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.hook = hook or name
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    @cached_property
    def row_bytes(self) -> int:
        return self.shape[1] * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as ``[stop - start, d]``: one range request."""
        start, stop = max(0, int(start)), min(self.shape[0], int(stop))
        if stop <= start:
            return np.zeros((0, self.shape[1]), dtype=self.dtype)
        data = self.files.read_range(self.name, self.header + start * self.row_bytes,
                                     self.header + stop * self.row_bytes)
        return self._checked(np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.shape[1]),
                             np.arange(start, stop))

    def take(self, rows) -> np.ndarray:
        """The given rows (ints, any order, repeats allowed) as ``[len(rows), d]``."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = self.shape[0]
        if len(rows) and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {self.hook} with {n} rows")
        rows = np.where(rows < 0, rows + n, rows)
        uniq = np.unique(rows)
        if len(uniq) == 0:
            return np.zeros((0, self.shape[1]), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(uniq, breaks)]
        parts = self.files.read_ranges(self.name, [(self.header + a * self.row_bytes, self.header + b * self.row_bytes)
                                                   for a, b in runs])
        got = np.concatenate([np.frombuffer(p, dtype=self.dtype).reshape(-1, self.shape[1]) for p in parts])
        got = self._checked(got, uniq)
        return got[np.searchsorted(uniq, rows)]

    def _checked(self, arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(arr).all(1)
        if bad.any():
            from replab.store.format import describe_rows

            raise ReplabError(f"{self.files.url_of(self.name)}: {self.hook} holds NaN or inf activations "
                              f"({describe_rows(rows[bad])}); the store is unusable: harvest it again")
        return arr

    def __getitem__(self, key):
        cols = slice(None)
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("a store tensor has two axes: [rows, d]")
            key, cols = key
        if isinstance(key, (int, np.integer)):
            out = self.take([int(key)])[0]
        elif isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            out = self.rows(start, stop) if step == 1 else self.take(np.arange(start, stop, step))
        else:
            idx = np.asarray(key)
            if idx.dtype == bool:
                if idx.shape != (self.shape[0],):
                    raise IndexError(f"boolean index of length {len(idx)} for {self.shape[0]} rows")
                idx = np.flatnonzero(idx)
            out = self.take(idx)
        if isinstance(cols, slice) and cols == slice(None):
            return out
        return out[..., cols]

    def __array__(self, dtype=None, copy=None):
        step = max(1, (1 << 26) // max(1, self.row_bytes))
        out = np.concatenate([self.rows(lo, lo + step) for lo in range(0, self.shape[0], step)]) \
            if self.shape[0] else np.zeros(self.shape, dtype=self.dtype)
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __repr__(self) -> str:
        return f"RangeArray({self.files.url_of(self.name)!r}, shape={self.shape}, dtype={self.dtype.name})"
