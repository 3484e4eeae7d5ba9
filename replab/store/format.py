"""On-disk format of an activation store (documented in README, "Activation store").

A store is one directory::

    manifest.json          model identity, dataset, config, tensor list with sha256; written last
    index.parquet          one row per stored vector (example, position, token, labels, split)
    tensors/<hook>.npy     one standard .npy per hook, shape [rows, d], aligned with the index
    _progress.json         only while a harvest is running or was interrupted

Every tensor file is a plain ``.npy`` (no pickle), preallocated at full size and
filled batch by batch, so ``numpy.load(path, mmap_mode="r")`` reads it without replab.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from replab.errors import ReplabError
from replab.io import inside, sha256_file
from replab.io import read_json as _read_json

FORMAT = "replab.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.parquet"
PROGRESS = "_progress.json"
TENSOR_DIR = "tensors"


def tensor_file(hook: str) -> str:
    """Relative path of a hook's tensor file, e.g. ``tensors/blocks.14.hook_resid_post.npy``."""
    return f"{TENSOR_DIR}/{hook}.npy"


STORE_DTYPES = ("float32", "float16")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (:func:`replab.io.read_json`)."""
    return _read_json(path, what)


def parse_json(data: bytes, where: str, what: str) -> dict:
    """A JSON object from raw bytes (a remote file); one-line ReplabError naming ``where``."""
    import json

    try:
        out = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReplabError(f"{where}: unreadable {what} ({exc.__class__.__name__})") from None
    if not isinstance(out, dict):
        raise ReplabError(f"{where}: unreadable {what} (not a JSON object)")
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def manifest_files(root: Path | str, manifest: dict) -> tuple[dict, dict[str, dict]]:
    """Validate a complete store's manifest; return ``(index entry, {hook: tensor entry})``.

    Every entry gets a ``path``: its ``file`` resolved with :func:`replab.io.inside`, so a
    manifest that names ``../outside.npy``, an absolute path or a symlink leaving the store
    is refused before anything is opened. Wrong types (a hand-edited or damaged manifest)
    are one-line ReplabErrors naming the manifest, never a KeyError.
    """
    where = f"{root}/{MANIFEST}" if isinstance(root, str) else root / MANIFEST

    def bad(msg: str):
        raise ReplabError(f"{where}: malformed manifest ({msg})")

    if manifest.get("format") != FORMAT or manifest.get("status") != "complete":
        raise ReplabError(f"{where}: not a complete replab activation store")
    n_rows = manifest.get("n_rows")
    if not _is_int(n_rows) or n_rows < 0:
        bad(f"n_rows is {n_rows!r}")
    for key in ("model", "dataset", "config"):
        if not isinstance(manifest.get(key), dict):
            bad(f"{key!r} must be an object")
    index = manifest.get("index")
    if not isinstance(index, dict) or not isinstance(index.get("sha256"), str):
        bad("'index' must be an object with 'file' and 'sha256'")
    index = {**index, "path": inside(root, index.get("file"), "index file")}
    tensors = manifest.get("tensors")
    if not isinstance(tensors, list) or not tensors:
        bad("'tensors' must be a non-empty list")
    out: dict[str, dict] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, dict) or not isinstance(t.get("hook"), str) or not t["hook"]:
            bad(f"tensor {i} has no hook name")
        hook = t["hook"]
        if hook in out:
            bad(f"hook {hook!r} is listed twice")
        shape = t.get("shape")
        if (not isinstance(shape, list) or len(shape) != 2 or not all(map(_is_int, shape))
                or shape[0] != n_rows or shape[1] < 1):
            bad(f"tensor {hook!r} has shape {shape!r}, expected [{n_rows}, d]")
        if t.get("dtype") not in STORE_DTYPES:
            bad(f"tensor {hook!r} has dtype {t.get('dtype')!r}; stores hold {' or '.join(STORE_DTYPES)}")
        if not isinstance(t.get("sha256"), str):
            bad(f"tensor {hook!r} has no sha256")
        out[hook] = {**t, "path": inside(root, t.get("file"), f"tensor file of {hook}")}
    return index, out


def npy_header(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """The exact bytes numpy writes before the data of an array of this shape and dtype."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)},
    )
    return buf.getvalue()


def expected_size(shape: tuple[int, int], dtype) -> int:
    return len(npy_header(shape, dtype)) + int(np.prod(shape)) * np.dtype(dtype).itemsize


def preallocate(path: Path, shape: tuple[int, int], dtype) -> int:
    """Create (or keep) a full-size .npy file; returns the header length."""
    header = npy_header(shape, dtype)
    size = len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.seek(0)
        f.write(header)
        f.truncate(size)
    return len(header)


def check_tensor_file(path: Path, shape, dtype, sha256: str | None = None) -> None:
    """Raise a ReplabError naming ``path`` if it is missing, truncated, or corrupted."""
    if not path.exists():
        raise ReplabError(f"{path}: tensor file is missing")
    want = expected_size(tuple(shape), dtype)
    got = path.stat().st_size
    if got != want:
        raise ReplabError(f"{path}: truncated or wrong size ({got} bytes, expected {want})")
    with open(path, "rb") as f:
        head = f.read(len(npy_header(tuple(shape), dtype)))
    if head != npy_header(tuple(shape), dtype):
        raise ReplabError(f"{path}: corrupted .npy header")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ReplabError(f"{path}: checksum mismatch (file is corrupted)")


def nonfinite_rows(arr, chunk_bytes: int = 1 << 26) -> np.ndarray:
    """Row numbers ``[m]`` of a ``[rows, d]`` array (memory map) holding NaN or inf.

    Reads in chunks of about ``chunk_bytes``, so a large memory-mapped tensor is checked
    without loading it whole.
    """
    n = arr.shape[0]
    step = max(1, chunk_bytes // max(1, arr.shape[1] * arr.dtype.itemsize))
    bad = [lo + np.flatnonzero(~np.isfinite(np.asarray(arr[lo:lo + step])).all(1))
           for lo in range(0, n, step)]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def describe_rows(rows, limit: int = 5) -> str:
    """``"rows 3, 17, 40"`` / ``"rows 3, 17, 40, 41, 42 and 7 more"``."""
    rows = [int(r) for r in rows]
    shown = ", ".join(map(str, rows[:limit]))
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def split_of(key: str) -> str:
    """Deterministic 80/20 train/test split by group (or example) key."""
    return "test" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 5 == 0 else "train"
