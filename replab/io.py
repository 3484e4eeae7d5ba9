"""File plumbing shared by every artifact: atomic writes, hashing, and path containment.

* :func:`write_bytes_atomic` / :func:`write_text_atomic` / :func:`write_json_atomic` write to a
  temporary file in the same directory, fsync it and rename it into place, so a reader never
  sees half a file (a kill leaves the old file or the new one);
* :func:`atomic_dir` builds a directory under a temporary name and renames it into place;
* :func:`sha256_file` hashes a file in chunks;
* :func:`inside` resolves a file name read from an artifact (a manifest, a run summary)
  against the artifact's directory and refuses anything that would leave it (``..``,
  absolute paths, symlinks pointing outside): loading an artifact never reads other files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from replab.errors import ReplabError


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path, text: str) -> Path:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, data, indent: int = 1, sort_keys: bool = True) -> Path:
    """Write ``data`` as JSON (with a final newline) atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n")


@contextmanager
def atomic_dir(final):
    """Yield a temporary sibling directory of ``final``; on success it replaces ``final``.

    On an exception the temporary directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.{os.getpid()}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def inside(root, name, what: str = "file") -> Path:
    """``root / name`` resolved, or a ReplabError if it would leave ``root``.

    ``name`` comes from an artifact's own metadata (a manifest's tensor list, a summary's file
    list); an absolute path, ``..`` segments or a symlink that resolves outside ``root`` is
    refused, so reading an artifact never opens a file elsewhere (``../../etc/passwd``).
    """
    root = Path(root)
    text = str(name)
    if not text or os.path.isabs(text) or Path(text).is_absolute():
        raise ReplabError(f"{root}: {what} {text!r} is not a path inside the directory")
    base = root.resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise ReplabError(f"{root}: {what} {text!r} points outside the directory")
    return target
