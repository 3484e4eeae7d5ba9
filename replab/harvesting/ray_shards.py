"""The Ray harvest engine: shards of batches on Ray actors, one writer on the driver.

``harvest(..., engine="ray")`` (``replab harvest --engine ray``) runs the same
:class:`~replab.harvesting.run.HarvestPlan` as the local engine:

1. the batches still to compute (after a resume) are cut into **shards**: contiguous runs of
   whole batches, the same batches (same ``batch_size``, same padding) the local loop runs,
   about four shards per worker and at most 64 MiB of activations each;
2. ``workers`` Ray actors each load the model once (:func:`replab.distributed.load_worker_model`,
   checked against the driver's weights) and compute a shard with
   :func:`~replab.harvesting.run.batch_arrays`, the one function the local loop calls too;
3. the shards' rows come back to the driver through Ray's object store, in shard order
   (a bounded window: at most ``2 × workers`` shards held), and the driver hands every batch
   to the one :class:`~replab.store.writer.StoreWriter`. It writes each batch once at its row
   offset, fsyncs, and journals it with its sha256 (an atomic rename of ``_progress.json``);
   it refuses a batch twice or out of order, and writes the index and ``manifest.json`` last,
   only when every row arrived.

A worker killed mid-shard is restarted by Ray and the shard recomputed; the driver receives
each shard's result once. The store is byte-identical to a local harvest of the same inputs
(``tests/test_distributed.py``). Only the driver touches ``out``, so workers on other machines need
no shared file system; the activations cross the network once, worker -> driver.
"""

from __future__ import annotations

import math

from replab._progress import progress_bar
from replab.distributed import ModelWorker, crash_point, start_pool

SHARD_BYTES = 64 << 20
SHARDS_PER_WORKER = 4


class HarvestWorker(ModelWorker):
    """A Ray actor holding one model; computes shards of a harvest."""

    def run_shard(self, compute, batches: list[tuple], names: list[str], stop) -> list[tuple]:
        """``[(batch, first row, {hook: [rows, d]})]`` for ``batches`` of
        ``(batch, first row, token lists, positions)``; ``compute`` is
        :func:`replab.harvesting.run.batch_arrays` (passed by reference)."""
        import os
        import time

        delay = float(os.environ.get("REPLAB_TEST_BATCH_DELAY") or 0)   # the kill test's slow-down
        out = []
        for b, row_start, tokens, chosen in batches:
            out.append((b, row_start, compute(self.model, tokens, chosen, names, stop)))
            crash_point()                    # tests: a worker dies mid-shard, after computing rows
            if delay:
                time.sleep(delay)
        return out


def plan_shards(first: int, n_batches: int, n_workers: int, batch_bytes: int,
                shard_batches: int | None = None) -> list[tuple[int, int]]:
    """Contiguous ``[lo, hi)`` batch ranges covering ``first .. n_batches - 1``: about
    :data:`SHARDS_PER_WORKER` per worker, each at most :data:`SHARD_BYTES` of activations
    (at least one batch), or ``shard_batches`` batches each when given."""
    left = n_batches - first
    if left <= 0:
        return []
    if shard_batches is None:
        by_count = math.ceil(left / (SHARDS_PER_WORKER * max(1, n_workers)))
        by_bytes = max(1, SHARD_BYTES // max(1, batch_bytes))
        shard_batches = max(1, min(by_count, by_bytes))
    return [(lo, min(n_batches, lo + shard_batches)) for lo in range(first, n_batches, shard_batches)]


def run_shards(model, writer, hp, first: int, compute, progress: bool = True, workers: int | None = None,
               address: str | None = None, shard_batches: int | None = None,
               cpus_per_worker: float | None = None) -> dict:
    """Compute batches ``first..`` of ``hp`` on Ray actors and submit them, in order, to
    ``writer``; returns ``{"workers", "shards", "rows", "start_seconds", "seconds"}``
    (``start_seconds``: connecting, starting the actors and loading the model on each).

    Args:
        model: the driver's model (workers load the same one: :func:`replab.distributed.model_spec`).
        writer: a started :class:`~replab.store.writer.StoreWriter`.
        hp: the :class:`~replab.harvesting.run.HarvestPlan`.
        compute: the batch function, :func:`replab.harvesting.run.batch_arrays` (the local
            loop's own, so both engines run the same computation).
        workers: actors (default: what the cluster holds: :func:`replab.distributed.start_pool`).
        address: see :func:`replab.distributed.connect`.
        shard_batches: batches per shard (default: :func:`plan_shards`).
        cpus_per_worker: Ray CPUs of each actor (default: the driver's torch threads, which
            every worker uses).
    """
    import time

    width = sum(hp.dims.values()) * 4
    mean_rows = hp.index.shape[0] / max(1, hp.n_batches)
    t0 = time.perf_counter()
    pool = start_pool(HarvestWorker, model, workers, address, cpus_per_worker, max_workers=hp.n_batches - first)
    started = time.perf_counter() - t0
    shards = plan_shards(first, hp.n_batches, len(pool), int(mean_rows * width), shard_batches)
    jobs = [(compute, [(b, *hp.batch(b)) for b in range(lo, hi)], hp.names, hp.stop) for lo, hi in shards]
    rows_before = int(hp.starts[min(len(hp.token_lists), first * hp.batch_size)])
    try:
        label = f"harvest (ray, {len(pool)} worker{'s' if len(pool) > 1 else ''})"
        with progress_bar(len(hp.index), label, unit="row", enabled=progress) as bar:
            bar.advance(rows_before)

            def done(i, result):
                bar.advance(sum(next(iter(arrays.values())).shape[0] for _, _, arrays in result))

            for result in pool.map("run_shard", jobs, on_done=done):
                for b, row_start, arrays in result:
                    writer.submit(b, row_start, arrays)
    finally:
        pool.close()
    return {"workers": len(pool.info), "shards": len(shards), "rows": len(hp.index) - rows_before,
            "start_seconds": started, "seconds": time.perf_counter() - t0}
