"""File plumbing shared by every artifact: atomic writes, hashing, and path containment.

* :func:`write_bytes_atomic` / :func:`write_text_atomic` / :func:`write_json_atomic` write to a
  temporary file in the same directory, fsync it and rename it into place, so a reader never
  sees half a file (a kill leaves the old file or the new one);
* :func:`atomic_dir` builds a directory under a temporary name and renames it into place;
* :func:`sha256_file` hashes a file in chunks;
* :func:`read_text` reads UTF-8 text with a one-line error naming the bad byte's line;
  :func:`read_json` / :func:`read_table` read a JSON object / a Parquet table with one-line errors;
* :func:`writable_dir` / :class:`DirLock`: an output directory that exists, is writable and
  has one writer at a time;
* :func:`inside` resolves a file name read from an artifact (a manifest, a run summary)
  against the artifact's directory and refuses anything that would leave it (``..``,
  absolute paths, symlinks pointing outside): loading an artifact never reads other files.
  The directory may be an fsspec URL (``s3://bucket/store``): then the name is joined to the
  URL and the same ``..`` / absolute / other-URL refusals apply (object stores have no symlinks);
* :func:`location` turns what a user typed into a local :class:`~pathlib.Path` (plain paths and
  ``file://`` URLs) or a normalised URL string (``s3://``, ``gs://``, ``memory://`` ...).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
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


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://(.*)$")
# A pathlib.Path made from "s3://b/k" collapses the double slash ("s3:/b/k"); these are the
# protocols whose collapsed form :func:`location` restores (a CLI option typed as Path).
_COLLAPSED = re.compile(r"^(s3|s3a|gs|gcs|memory|az|abfs|abfss|adl|hf|hdfs|oss|oci|ftp|sftp|http|https):/(?!/)(.*)$")


def is_url(path) -> bool:
    """True for a remote fsspec URL (``s3://``, ``gs://``, ``memory://`` ...); False for a local
    path and for ``file://`` URLs (which :func:`location` turns into local paths)."""
    return isinstance(location(path), str)


def location(path) -> Path | str:
    """A local :class:`~pathlib.Path`, or a remote URL as a normalised string.

    ``file:///abs/dir`` becomes ``Path("/abs/dir")``; ``s3://bucket//a/b/`` becomes
    ``"s3://bucket/a/b"``; a Path that collapsed a URL's ``//`` (``Path("s3://b/k")`` is
    ``s3:/b/k``) is restored when no such local file exists. Everything else is a Path.
    """
    text = os.fspath(path)
    m = _URL.match(text)
    if m is None:
        collapsed = _COLLAPSED.match(text)
        if collapsed is None or os.path.exists(text):
            return Path(text)
        m = _URL.match(f"{collapsed.group(1)}://{collapsed.group(2)}")
    proto, rest = m.group(1).lower(), m.group(2)
    if proto in ("file", "local"):
        return Path("/" + rest.lstrip("/"))
    rest = posixpath.normpath("/" + rest).lstrip("/") if rest else ""
    return f"{proto}://{rest}"


def url_join(root: str, name: str) -> str:
    """``root/name`` for a URL root (no normalisation of ``name``; see :func:`inside`)."""
    return root.rstrip("/") + "/" + name


def inside(root, name, what: str = "file", follow_links: bool = True) -> Path | str:
    """``root / name`` resolved, or a ReplabError if it would leave ``root``.

    ``name`` comes from an artifact's own metadata (a manifest's tensor list, a summary's file
    list); an absolute path, ``..`` segments or a symlink that resolves outside ``root`` is
    refused, so reading an artifact never opens a file elsewhere (``../../etc/passwd``).
    For a URL ``root`` (:func:`location`) the result is a URL string: ``name`` may not be
    absolute, hold a URL (``s3://other/x``), a backslash, or ``..`` segments that leave ``root``.
    ``follow_links=False`` checks the name only (no absolute path, no ``..`` leaving
    ``root``) and returns ``root / name`` unresolved: for directories whose files are
    symlinks by design (a Hugging Face hub snapshot links its files into ``../../blobs``).
    """
    root = location(root)
    if isinstance(root, str):
        return _inside_url(root, name, what)
    if not isinstance(name, (str, os.PathLike)):
        raise ReplabError(f"{root}: {what} {name!r} is not a file name")
    text = str(name)
    if not text or "\x00" in text or os.path.isabs(text) or Path(text).is_absolute():
        raise ReplabError(f"{root}: {what} {text!r} is not a path inside the directory")
    if not follow_links:
        norm = os.path.normpath(text)
        if norm == ".." or norm.startswith(".." + os.sep):
            raise ReplabError(f"{root}: {what} {text!r} points outside the directory")
        return root / norm
    base = root.resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise ReplabError(f"{root}: {what} {text!r} points outside the directory")
    return target


def _inside_url(root: str, name, what: str) -> str:
    if not isinstance(name, str):
        raise ReplabError(f"{root}: {what} {name!r} is not a file name")
    if (not name or any(c in name for c in "\x00\\%?#") or name.startswith("/") or _URL.match(name)
            or ":" in name.split("/")[0]):      # % ? #: a server could decode or cut the name
        raise ReplabError(f"{root}: {what} {name!r} is not a path inside the directory")
    joined = posixpath.normpath(name)
    if joined == ".." or joined.startswith("../") or joined == ".":
        raise ReplabError(f"{root}: {what} {name!r} points outside the directory")
    return url_join(root, joined)


def read_text(path, what: str = "file") -> str:
    """A UTF-8 text file's contents (a leading byte-order mark is dropped).

    Raises ReplabError naming the file when it is missing or unreadable, and naming the
    line, column and offending byte when it is not valid UTF-8 (a file saved as Latin-1 or
    UTF-16, a binary file), instead of a ``UnicodeDecodeError`` traceback.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ReplabError(f"{path}: {what} does not exist") from None
    except IsADirectoryError:
        raise ReplabError(f"{path}: is a directory, not a {what}") from None
    except OSError as exc:
        raise ReplabError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise ReplabError(
            f"{path}: line {line}, column {column}: byte 0x{data[start]:02x} is not valid UTF-8 "
            f"({exc.reason}); save the {what} as UTF-8"
        ) from None


def read_json(path, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; one-line ReplabError naming the file when it is missing,
    not UTF-8, not valid JSON or not an object."""
    path = Path(path)
    if not path.exists():
        raise ReplabError(f"{path}: missing {what}")
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReplabError(f"{path}: unreadable {what} (invalid JSON at line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ReplabError(f"{path}: unreadable {what} (not a JSON object)")
    return data


def read_table(path, what: str = "table"):
    """A Parquet table (``pandas.DataFrame``) from ``path``; one-line ReplabError naming the
    file when it is missing or not a readable Parquet file (truncated, overwritten, not Parquet)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ReplabError(f"{path}: missing {what}")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ReplabError(f"{path}: unreadable {what} ({first})") from None


def writable_dir(path, what: str = "output directory") -> Path:
    """Create ``path`` (and parents) if needed and check it is a writable directory.

    One-line ReplabErrors for the usual mistakes: ``path`` is a regular file, a parent is a
    file, or the location is not writable (permissions, a read-only file system).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ReplabError(f"{path}: {what} is a file, not a directory; choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ReplabError(f"{path}: a parent of the {what} is a file, not a directory") from None
    except NotADirectoryError:
        raise ReplabError(f"{path}: a parent of the {what} is a file, not a directory") from None
    except OSError as exc:
        raise ReplabError(f"{path}: cannot create the {what} ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ReplabError(f"{path}: {what} is not writable")
    return path


class DirLock:
    """An exclusive advisory lock on a directory (``flock`` on the directory itself).

    No lock file is created, and the lock disappears with the process (``kill -9``
    included). :meth:`acquire` raises ReplabError when another process holds it;
    :func:`dir_locked` asks without taking it. On systems without ``fcntl`` it is a no-op.
    """

    def __init__(self, path, holder: str = "another process"):
        self.path = Path(path)
        self.holder = holder
        self._fd: int | None = None

    def acquire(self, busy_message: str | None = None) -> DirLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return self
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ReplabError(busy_message or f"{self.path}: {self.holder} is using this directory") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def dir_locked(path) -> bool:
    """True when another open descriptor holds a :class:`DirLock` on ``path``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def json_plain(value):
    """A JSON-safe copy: dicts with string keys, lists for tuples and arrays, Python numbers for
    numpy scalars, strings for paths, None for NaN and ±inf (which JSON cannot hold)."""
    if isinstance(value, dict):
        return {str(k): json_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:      # numpy arrays, tensors
        return json_plain(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
