"""One way to bound CPU threads for a block of work (torch intra-op and numpy's BLAS).

On a shared 2-core machine, interleaving small numpy BLAS calls with torch matmuls makes the
two thread pools spin against each other (20x slower measured), and two torch threads that
wait for each other at every op made the lens tables 3-4x slower than one.
"""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def limit_threads(n: int | None, blas: int | None = None):
    """Run the block with ``n`` torch threads (None: unchanged) and numpy's BLAS limited to
    ``blas`` threads (None: unchanged). Restores both on exit."""
    import torch

    old = torch.get_num_threads()
    pool = None
    if n:
        torch.set_num_threads(max(1, int(n)))
    if blas:
        from threadpoolctl import threadpool_limits

        pool = threadpool_limits(limits=int(blas))
    try:
        yield
    finally:
        if pool is not None:
            pool.restore_original_limits()
        torch.set_num_threads(old)
