"""One pair of cached clean/corrupt forwards for several plans with different bases.

A block sweep runs necessity variants on the clean run and sufficiency variants on the
corrupt run; :func:`shared_forwards` caches, in one clean and one corrupt forward, every hook
both plans (and their engine checks) read, so the two ``run_plan`` calls share them.
"""

from __future__ import annotations

import torch

from replab.patching.engine import cache_forwards, needed_hooks, prefix_ok
from replab.patching.plan import engine_variants, plan_layer


def shared_forwards(model, task, plans) -> dict:
    """``plans``: ``[(variants, base), ...]``. Returns ``{"clean", "corrupt"}`` forwards caching
    every hook any of them needs (in both runs), ready for ``run_plan(..., forwards=)``."""
    use_prefix = prefix_ok(model)
    names: set[str] = set()
    for variants, base in plans:
        layer = plan_layer(list(variants), model.cfg.n_layers)
        for hooks in needed_hooks(model, [*variants, *engine_variants(layer, base)], base, use_prefix).values():
            names |= hooks
    with torch.inference_mode():
        return cache_forwards(model, task.clean, task.corrupt, {"clean": set(names), "corrupt": set(names)})
