"""Writing an activation store: streaming, bounded memory, resumable.

:class:`StoreWriter` preallocates one ``.npy`` per hook, then a background
thread writes each batch's rows at their offsets while the next batch runs.
After every batch it atomically rewrites ``_progress.json`` (the number of
batches done). After a kill (``kill -9`` included) the same harvest resumes
from that batch; batches are recomputed deterministically, so the finished
store is byte-identical to an uninterrupted run. ``manifest.json`` is written
last: a directory without it is never mistaken for a complete store.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from replab.errors import ReplabError
from replab.io import sha256_file, write_json_atomic
from replab.store import format as fmt


def plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


class StoreWriter:
    """Write a store at ``out`` for a fixed ``plan`` (model, dataset, config, shapes).

    Args:
        out: the store directory.
        plan: JSON-able dict that fully determines the store's content.
        index: the index DataFrame (``n_rows`` rows, known before any forward).
        dims: ``{hook: d}`` width of each tensor.
        dtype: numpy dtype of the tensors.
        queue_size: batches that may wait for the disk (bounds memory).
    """

    def __init__(self, out, plan: dict, index: pd.DataFrame, dims: dict[str, int], dtype,
                 queue_size: int = 2):
        self.out = Path(out)
        self.plan = plan
        self.hash = plan_hash(plan)
        self.index = index
        self.dims = dims
        self.dtype = np.dtype(dtype)
        self.n_rows = len(index)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._files: dict = {}
        self._offsets: dict[str, int] = {}
        self.complete = False

    # ----------------------------------------------------------------- set-up
    def start(self) -> int:
        """Prepare the directory and return the first batch still to compute."""
        manifest = self.out / fmt.MANIFEST
        progress = self.out / fmt.PROGRESS
        if manifest.exists():
            data = fmt.read_json(manifest, "manifest")
            if data.get("plan_hash") != self.hash:
                raise ReplabError(
                    f"{manifest}: this directory holds a store made with a different model, "
                    "dataset or config; choose another --out or delete it"
                )
            from replab.store.store import open_store

            open_store(self.out)  # size/header checks: a damaged file is named
            progress.unlink(missing_ok=True)
            self.complete = True
            return self.plan["n_batches"]
        if progress.exists():
            data = fmt.read_json(progress, "progress journal")
            if data.get("plan_hash") != self.hash:
                raise ReplabError(
                    f"{progress}: an interrupted harvest with a different model, dataset or "
                    "config is here; rerun that command, or delete the directory"
                )
            done = int(data["batches_done"])
            self._open_files(resume=True)
        else:
            if self.out.exists() and any(self.out.iterdir()):
                raise ReplabError(f"{self.out}: directory exists and is not an activation store")
            self.out.mkdir(parents=True, exist_ok=True)
            done = 0
            self._write_index()
            self._open_files(resume=False)
            self._journal(0)
        self._thread = threading.Thread(target=self._run, name="replab-store-writer", daemon=True)
        self._thread.start()
        return done

    def _write_index(self) -> None:
        path = self.out / fmt.INDEX
        tmp = path.with_name(f".{path.name}.tmp")
        self.index.to_parquet(tmp, index=False, compression="zstd")
        os.replace(tmp, path)

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
        if resume and not (self.out / fmt.INDEX).exists():
            self._write_index()

    def _journal(self, batches_done: int) -> None:
        write_json_atomic(
            self.out / fmt.PROGRESS,
            {"plan_hash": self.hash, "batches_done": batches_done, "plan": self.plan},
        )

    # ---------------------------------------------------------------- writing
    def submit(self, batch: int, row_start: int, arrays: dict[str, np.ndarray]) -> None:
        """Queue one batch's rows (blocks when ``queue_size`` batches are waiting)."""
        if self._error is not None:
            raise self._error
        self._queue.put((batch, row_start, arrays))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            batch, row_start, arrays = item
            try:
                for hook, arr in arrays.items():
                    arr = np.ascontiguousarray(arr, dtype=self.dtype)
                    f = self._files[hook]
                    f.seek(self._offsets[hook] + row_start * arr.shape[1] * self.dtype.itemsize)
                    f.write(arr.tobytes())
                    f.flush()
                self._journal(batch + 1)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self._error = exc

    def _drain(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        for f in self._files.values():
            f.close()
        self._files = {}
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the writer thread, keeping the journal (the harvest can resume)."""
        try:
            self._drain()
        except BaseException:  # noqa: BLE001 - closing after another error
            pass

    def finish(self, manifest: dict) -> Path:
        """Flush, checksum every file, write ``manifest.json`` last, drop the journal."""
        if self.complete:
            return self.out
        self._drain()
        tensors = []
        for hook, d in self.dims.items():
            path = self.out / fmt.tensor_file(hook)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
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
        return self.out
