"""Writing an activation store: streaming, bounded memory, resumable, one writer at a time.

:class:`StoreWriter` preallocates one ``.npy`` per hook, then a background
thread writes each batch's rows at their offsets while the next batch runs.
After every batch it fsyncs the tensor files, then atomically rewrites
``_progress.json``: the batches done, each with its row range and the sha256 of
its bytes. After a kill (``kill -9`` included) the same harvest resumes: every
journalled batch is re-read and checked against its checksum first, and the
harvest restarts at the first batch that does not match (a damaged or edited
row is recomputed, never kept). Batches are recomputed deterministically, so the
finished store is byte-identical to an uninterrupted run. ``manifest.json`` is
written last: a directory without it is never mistaken for a complete store.

While it writes, the writer holds an exclusive lock on the directory
(:class:`replab.io.DirLock`): a second harvest into the same ``--out`` stops at
once with a one-line error, and :func:`replab.open_store` says a harvest is
running there instead of calling the store interrupted.

Every engine (the single-process loop, the Ray shards of
:mod:`replab.harvesting.ray_shards`) hands its batches to this one writer, which takes them
**exactly once and in order**: a batch submitted twice, out of order, or not starting at
the row where the previous one ended is refused, and :meth:`StoreWriter.finish` refuses to
write the manifest unless every batch and every row arrived. So a retried Ray task can
neither duplicate nor drop a row.

An fsspec URL as ``out`` (``s3://bucket/store``, ``memory://x``): the store is built in a
local staging directory (``$REPLAB_STAGING`` or ``~/.cache/replab/staging/<hash of the
URL and plan>``, with the same journal, lock and resume), then uploaded object by object, one PUT
each: tensors, index, ``manifest.json`` last. A ``_progress.json`` object marks the URL as
taken by this plan from the start to the end of the upload. Object stores have no atomic
rename, but each PUT shows all of an object or nothing, and readers ignore a store without
its manifest, so a reader never sees a half-written store.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.io import DirLock, location, sha256_file, writable_dir, write_json_atomic
from replab.store import format as fmt


def plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def staging_dir(url: str, plan_sha: str) -> Path:
    """Local directory where a store bound for ``url`` (with this plan hash) is built before
    its upload: ``$REPLAB_STAGING`` or ``~/.cache/replab/staging``, then a hash of both."""
    root = os.environ.get("REPLAB_STAGING")
    if not root:
        from replab.models.cache import cache_dir

        root = cache_dir() / "staging"
    return Path(root) / hashlib.sha256(f"{url}\n{plan_sha}".encode()).hexdigest()[:24]


class StoreWriter:
    """Write a store at ``out`` for a fixed ``plan`` (model, dataset, config, shapes).

    Args:
        out: the store directory, or an fsspec URL (staged locally, uploaded by :meth:`finish`).
        plan: JSON-able dict that fully determines the store's content.
        index: the index DataFrame (``n_rows`` rows, known before any forward).
        dims: ``{hook: d}`` width of each tensor.
        dtype: numpy dtype of the tensors.
        queue_size: batches that may wait for the disk (bounds memory).
        staging: the local staging directory for a URL ``out`` (default :func:`staging_dir`).

    Attributes:
        recomputed: journalled batches whose bytes no longer matched their checksum on
            resume (they and every later batch are computed again).
    """

    def __init__(self, out, plan: dict, index: pd.DataFrame, dims: dict[str, int], dtype,
                 queue_size: int = 2, staging=None):
        loc = location(out)
        self.url = loc if isinstance(loc, str) else None
        self.remote = None
        if self.url is not None:
            from replab.store.remote import RemoteFiles

            self.remote = RemoteFiles(self.url)
        self.plan = plan
        self.hash = plan_hash(plan)
        if self.url is not None:
            loc = Path(staging) if staging is not None else staging_dir(self.url, self.hash)
        self.out = loc
        self.index = index
        self.dims = dims
        self.dtype = np.dtype(dtype)
        self.n_rows = len(index)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._files: dict = {}
        self._offsets: dict[str, int] = {}
        self._batches: list[dict] = []
        self._lock: DirLock | None = None
        self.recomputed: list[int] = []
        self.complete = False
        self._next_batch = 0         # the batch submit() takes next (exactly once, in order)
        self._next_row = 0

    # ----------------------------------------------------------------- set-up
    def start(self) -> int:
        """Prepare (and lock) the directory and return the first batch still to compute."""
        if self.remote is not None and self._start_remote():
            return self.plan["n_batches"]
        if self.out.exists() and not self.out.is_dir():
            raise ReplabError(f"{self.out}: --out is a file, not a directory; choose a directory path")
        if self._complete_here():
            return self.plan["n_batches"]
        writable_dir(self.out, "store directory")
        self._lock = DirLock(self.out).acquire(self._busy_message())
        if (self.out / fmt.MANIFEST).exists():    # another harvest finished it meanwhile
            self._unlock()
            self._complete_here()
            return self.plan["n_batches"]
        try:
            done = self._prepare()
        except BaseException:
            self._close_files()
            self._unlock()
            raise
        self._next_batch = done
        self._next_row = int(self._batches[done - 1]["rows"][1]) if done else 0
        self._thread = threading.Thread(target=self._run, name="replab-store-writer", daemon=True)
        self._thread.start()
        return done

    # --------------------------------------------------------- object stores
    def _start_remote(self) -> bool:
        """A URL ``out``: True when the store there is complete (nothing to do, or only the
        upload of a finished staging directory). Else claims the URL with ``_progress.json``."""
        remote, url = self.remote, self.url
        if remote.exists(fmt.MANIFEST):
            data = fmt.parse_json(remote.read(fmt.MANIFEST), f"{url}/{fmt.MANIFEST}", "manifest")
            if data.get("plan_hash") != self.hash:
                raise ReplabError(f"{url}/{fmt.MANIFEST}: this location holds a store made with a different "
                                  "model, dataset or config; choose another --out or delete it")
            from replab.store.store import open_store

            open_store(url)
            self.complete = True
            return True
        if remote.exists(fmt.PROGRESS):
            data = fmt.parse_json(remote.read(fmt.PROGRESS), f"{url}/{fmt.PROGRESS}", "progress marker")
            if data.get("plan_hash") != self.hash:
                raise ReplabError(f"{url}/{fmt.PROGRESS}: an interrupted harvest with a different model, dataset "
                                  "or config is here; rerun that command, or delete it")
        elif remote.exists() and remote.listdir():
            raise ReplabError(f"{url}: location exists and is not an activation store")
        remote.write(fmt.PROGRESS, (json.dumps({"plan_hash": self.hash, "staging": str(self.out)}, indent=1,
                                               sort_keys=True) + "\n").encode())
        if (self.out / fmt.MANIFEST).exists() and self._complete_here():
            self._publish()
            return True
        return False

    def _publish(self) -> None:
        """Upload a finished staging directory: tensors, index, then the manifest (one PUT
        each), drop the marker and the staging directory."""
        import shutil

        manifest = fmt.read_json(self.out / fmt.MANIFEST, "manifest")
        for t in manifest["tensors"]:
            self.remote.put(self.out / t["file"], t["file"])
        self.remote.put(self.out / fmt.INDEX, fmt.INDEX)
        self.remote.write(fmt.MANIFEST, (self.out / fmt.MANIFEST).read_bytes())
        self.remote.remove(fmt.PROGRESS)
        shutil.rmtree(self.out, ignore_errors=True)

    def _busy_message(self) -> str:
        pid = None
        try:
            pid = json.loads((self.out / fmt.PROGRESS).read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            pass
        who = f" (pid {pid})" if isinstance(pid, int) else ""
        return (f"{self.out}: a harvest is already running into this directory{who}; "
                "wait for it to finish, or choose another --out")

    def _complete_here(self) -> bool:
        manifest = self.out / fmt.MANIFEST
        if not manifest.exists():
            return False
        data = fmt.read_json(manifest, "manifest")
        if data.get("plan_hash") != self.hash:
            raise ReplabError(
                f"{manifest}: this directory holds a store made with a different model, "
                "dataset or config; choose another --out or delete it"
            )
        from replab.store.store import open_store

        open_store(self.out)  # size/header checks: a damaged file is named
        (self.out / fmt.PROGRESS).unlink(missing_ok=True)
        self.complete = True
        return True

    def _prepare(self) -> int:
        progress = self.out / fmt.PROGRESS
        if progress.exists():
            data = fmt.read_json(progress, "progress journal")
            if data.get("plan_hash") != self.hash:
                raise ReplabError(
                    f"{progress}: an interrupted harvest with a different model, dataset or "
                    "config is here; rerun that command, or delete the directory"
                )
            self._write_index()               # deterministic: a damaged index is replaced
            self._open_files(resume=True)
            return self._check_journal(data)
        if any(self.out.iterdir()):
            raise ReplabError(f"{self.out}: directory exists and is not an activation store")
        self._write_index()
        self._open_files(resume=False)
        self._journal()
        return 0

    def _check_journal(self, data: dict) -> int:
        """Re-read every journalled batch; keep the prefix whose bytes match their sha256."""
        batches = data.get("batches")
        if not isinstance(batches, list):
            raise ReplabError(f"{self.out / fmt.PROGRESS}: progress journal has no batch checksums "
                              "(written by an older replab); delete the directory and harvest again")
        for b, entry in enumerate(batches):
            try:
                lo, hi = (int(x) for x in entry["rows"])
                ok = 0 <= lo <= hi <= self.n_rows and self._batch_sha(lo, hi) == entry["sha256"]
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                self.recomputed = list(range(b, len(batches)))
                warnings.warn(f"{self.out}: batch {b} on disk does not match its journal checksum; "
                              f"recomputing batches {b}-{len(batches) - 1} before resuming", stacklevel=3)
                self._batches = batches[:b]
                self._journal()
                return b
        self._batches = batches
        return len(batches)

    def _batch_sha(self, lo: int, hi: int) -> str:
        h = hashlib.sha256()
        for hook, d in self.dims.items():
            f = self._files[hook]
            f.seek(self._offsets[hook] + lo * d * self.dtype.itemsize)
            h.update(f.read((hi - lo) * d * self.dtype.itemsize))
        return h.hexdigest()

    def _write_index(self) -> None:
        path = self.out / fmt.INDEX
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.index.to_parquet(tmp, index=False, compression="zstd")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _open_files(self, resume: bool) -> None:
        for hook, d in self.dims.items():
            path = self.out / fmt.tensor_file(hook)
            shape = (self.n_rows, d)
            if resume:
                fmt.check_tensor_file(path, shape, self.dtype)
                self._offsets[hook] = len(fmt.npy_header(shape, self.dtype))
            else:
                self._offsets[hook] = fmt.preallocate(path, shape, self.dtype)
            self._files[hook] = open(path, "r+b")

    def _journal(self) -> None:
        write_json_atomic(
            self.out / fmt.PROGRESS,
            {"plan_hash": self.hash, "batches_done": len(self._batches), "batches": self._batches,
             "pid": os.getpid(), "plan": self.plan},
        )

    # ---------------------------------------------------------------- writing
    def submit(self, batch: int, row_start: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue one batch's rows (blocks when ``queue_size`` batches are waiting).

        The arrays are cast to the storage dtype here; NaN or inf values (a broken model,
        or a float16 overflow) are refused with an error naming the hook and the rows.
        """
        if self._error is not None:
            raise self._error
        if batch != self._next_batch:
            what = "twice" if batch < self._next_batch else "out of order"
            raise ReplabError(f"{self.out}: batch {batch} was submitted {what} (expected batch {self._next_batch}); "
                              "no batch is written twice or skipped")
        n = {int(np.shape(arrays[hook])[0]) for hook in self.dims}
        if row_start != self._next_row or len(n) != 1 or row_start + n.pop() > self.n_rows:
            raise ReplabError(f"{self.out}: batch {batch} starts at row {row_start} with rows of unequal count or "
                              f"past the end; expected rows from {self._next_row}")
        cast = {}
        for hook in self.dims:
            with np.errstate(over="ignore"):      # an overflow is reported below, by row
                arr = np.ascontiguousarray(arrays[hook], dtype=self.dtype)
            bad = fmt.nonfinite_rows(arr)
            if len(bad):
                rows = fmt.describe_rows(row_start + bad)
                finite_before = np.isfinite(np.asarray(arrays[hook], dtype=np.float32)[bad]).all()
                hint = (f"the values overflow {self.dtype.name}; harvest with --dtype float32"
                        if finite_before and self.dtype != np.float32 else
                        "the model produced them; check its weights and config")
                raise ReplabError(f"{hook}: NaN or inf activations in store {rows} (batch {batch}); {hint}")
            cast[hook] = arr
        self._queue.put((batch, row_start, cast))
        self._next_batch += 1
        self._next_row = row_start + next(iter(cast.values())).shape[0]

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            batch, row_start, arrays = item
            try:
                h = hashlib.sha256()
                n = 0
                for hook in self.dims:
                    data = arrays[hook].tobytes()
                    n = arrays[hook].shape[0]
                    h.update(data)
                    f = self._files[hook]
                    f.seek(self._offsets[hook] + row_start * arrays[hook].shape[1] * self.dtype.itemsize)
                    f.write(data)
                for hook in self.dims:        # the data is on disk before the journal vouches for it
                    self._files[hook].flush()
                    os.fsync(self._files[hook].fileno())
                self._batches.append({"batch": batch, "rows": [row_start, row_start + n],
                                      "sha256": h.hexdigest()})
                self._journal()
            except OSError as exc:
                self._error = ReplabError(f"{self.out}: cannot write the store "
                                          f"({exc.strerror or exc.__class__.__name__})")
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc

    def _drain(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._close_files()
        if self._error is not None:
            raise self._error

    def _close_files(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self) -> None:
        """Stop the writer thread, keeping the journal (the harvest can resume); unlock."""
        try:
            self._drain()
        except BaseException:  # noqa: BLE001 - closing after another error
            pass
        finally:
            self._unlock()

    def finish(self, manifest: dict) -> Path:
        """Flush, checksum every file, write ``manifest.json`` last, drop the journal, unlock."""
        if self.complete:
            return self.url or self.out
        try:
            self._drain()
            if self._next_batch != self.plan["n_batches"] or self._next_row != self.n_rows:
                raise ReplabError(f"{self.out}: only batches 0-{self._next_batch - 1} ({self._next_row} of "
                                  f"{self.n_rows} rows) arrived; the manifest is not written and the harvest "
                                  "can be resumed")
            tensors = []
            for hook, d in self.dims.items():
                path = self.out / fmt.tensor_file(hook)
                tensors.append({
                    "hook": hook, "file": fmt.tensor_file(hook), "shape": [self.n_rows, d],
                    "dtype": self.dtype.name, "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                })
            index_path = self.out / fmt.INDEX
            manifest = {
                **manifest,
                "format": fmt.FORMAT,
                "format_version": fmt.FORMAT_VERSION,
                "status": "complete",
                "plan_hash": self.hash,
                "n_rows": self.n_rows,
                "index": {"file": fmt.INDEX, "sha256": sha256_file(index_path),
                          "columns": list(self.index.columns)},
                "tensors": tensors,
            }
            write_json_atomic(self.out / fmt.MANIFEST, manifest)
            (self.out / fmt.PROGRESS).unlink(missing_ok=True)
            self.complete = True
        finally:
            self._unlock()
        if self.remote is not None:
            self._publish()
            return self.url
        return self.out
