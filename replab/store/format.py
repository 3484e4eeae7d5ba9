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
import json
from pathlib import Path

import numpy as np

from replab.errors import ReplabError
from replab.io import sha256_file

FORMAT = "replab.activation_store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.parquet"
PROGRESS = "_progress.json"
TENSOR_DIR = "tensors"


def tensor_file(hook: str) -> str:
    """Relative path of a hook's tensor file, e.g. ``tensors/blocks.14.hook_resid_post.npy``."""
    return f"{TENSOR_DIR}/{hook}.npy"


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ReplabError(f"{path}: missing {what}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ReplabError(f"{path}: unreadable {what} ({exc.__class__.__name__})") from None


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


def split_of(key: str) -> str:
    """Deterministic 80/20 train/test split by group (or example) key."""
    return "test" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 5 == 0 else "train"
